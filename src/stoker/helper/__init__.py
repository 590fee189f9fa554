"""stoker-helper: the small root process that does the few host operations a non-root
stokerd cannot (bridge, taps and their descriptors, nft rules in the caller's tables,
the guest DNS port), for the callers its own config names.

`protocol` (framing, fd passing), `config` (who may call and what each caller owns),
`server` (the root side: peer check, argument validation, the operations), `client`
(the daemon side: one request per connection, retried once when the helper goes away).
The client and protocol import nothing of the daemon's; the server uses the daemon's
`hostnet` leaves (Links, Firewall) to do the work, with names and tables from its config.
"""
