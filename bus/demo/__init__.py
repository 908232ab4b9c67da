"""The demo: the whole bus on one machine, on an embedded Redis by default."""
