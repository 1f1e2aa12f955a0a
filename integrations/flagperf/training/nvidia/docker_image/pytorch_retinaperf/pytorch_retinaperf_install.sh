#!/bin/bash
# FlagPerf's image manager runs <framework>_install.sh in the new container: retinaperf's image
# has everything installed already.
true
