"""What a run leaves for people: the event log, tables and the seed's report, plots.
Imports the base modules and measure/."""
