"""The wire: sans-I/O framing (protocol), typed message headers, the transport and handshake, codecs."""
