"""Everything that touches the reactor: sockets, timers, websocket, HTTP, signals."""
