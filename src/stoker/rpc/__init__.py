"""RPC: newline-delimited JSON over a unix socket. Wire format, client, server."""
