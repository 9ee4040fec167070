"""What every command shares at run time: its own lines on stderr, and starting Ray."""
