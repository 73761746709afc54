"""Sans-I/O wire codecs: bytes in, events out. No sockets, clocks or tasks."""
