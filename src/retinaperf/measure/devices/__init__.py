"""Device plug-ins: what is read of a device (monitor samples, energy, peak FLOP/s, driver
facts), per vendor, behind one interface (base.py); registry.py picks a device's plug-in."""
