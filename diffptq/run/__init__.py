"""One package function per script step: the experiment scripts parse flags and call these."""
