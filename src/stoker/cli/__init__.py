"""The `stoker` command line: parse, call the daemon, render. No business logic here."""
