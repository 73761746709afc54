"""meshctl: the command-line tool, and the local playground that runs the mesh without a cluster."""
