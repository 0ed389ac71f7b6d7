// Package agentproto is the wire protocol between the host (package
// guest/agentclient) and the agent that runs inside the guest (package
// guest/agent). It is a versioned, length-framed protocol over any ordered,
// reliable byte stream: a virtio-console port today, a Unix socket or an
// authenticated network connection later.
//
// # Frames
//
// Every message is one frame: a fixed 12-byte header followed by a payload.
// All integers are little-endian.
//
//	offset size field
//	0      2    magic   0x47 0x53 ("GS"); a frame that does not start with it is rejected
//	2      1    type    one of the Type constants below
//	3      1    flags   reserved, must be 0 in version 1
//	4      4    id      exec stream id; 0 for connection frames (hello, config, ping, ...)
//	8      4    length  payload length in bytes, at most MaxPayload (1 MiB)
//
// Both ends validate every frame before acting on it: the magic, the type
// (an unknown type is ErrUnknownType), the direction (a host-only frame
// received by the host is ErrWrongDirection), the id (stream frames need a
// non-zero id, connection frames need id 0), the length (over MaxPayload is
// ErrFrameTooLarge, checked before anything is allocated) and the payload
// (ErrBadPayload). All of them wrap ErrProtocol.
//
// # Payloads
//
// Data frames (Stdin, Stdout, Stderr) carry raw bytes, at most MaxData per
// frame. Window carries a 4-byte credit increment. Ping and Pong carry up to
// 64 opaque bytes. Control frames carry one JSON object each (the structs in
// this package: Hello, Config, Ready, ExecRequest, Started, SpawnError, Exit,
// Resize, Signal, Shutdown, ErrorInfo); unknown JSON fields are ignored so a
// later version can add fields, and every decoded struct is checked by its
// Validate method. JSON keeps the control messages readable in a hex dump and
// extensible; they are small and rare next to the data frames, which are raw.
//
// # Handshake and version negotiation
//
// The guest speaks first, so the host never writes to a port nobody has
// opened yet (a virtio-console port drops data that arrives before the guest
// opens it):
//
//	guest → host  Hello  {magic "gosandbox-agent", min_version, max_version}
//	host  → guest Config {version, time_unix_nano, hostname, env}
//	guest → host  Ready  {version, hostname, kernel, warnings}
//
// The host picks the highest version both sides speak (Negotiate) and sends
// it in Config; the guest sets its clock from time_unix_nano, its hostname
// from hostname (at most 64 bytes; see Hostname for how the host derives it
// from a sandbox name of up to 128 bytes) and adds env to every exec's
// environment, then answers Ready. Version 1 is the only version so far.
//
// # Exec streams
//
// The host opens stream id N (chosen by the host, non-zero, never reused on
// one connection) with Exec. The guest answers either SpawnError (the stream
// ends) or Started, then streams Stdout/Stderr, and finally Exit, after the
// process's output has been sent. The host may send Stdin, StdinClose,
// Resize and Signal at any time after Exec; frames for a stream that has
// already ended are ignored, since they can cross the Exit on the wire.
//
// # Flow control
//
// Each direction of each stream has a credit window, in payload bytes. The
// host grants the guest ExecRequest.Window bytes of Stdout+Stderr data; the
// guest grants the host Started.Window bytes of Stdin data. A sender never
// sends more data than its remaining credit; the receiver returns credit with
// Window frames as the data is consumed. A receiver that gets data beyond the
// credit it granted treats it as ErrProtocol. So a slow reader of one exec
// stalls only that exec, and each side buffers at most one window per stream.
//
// # Shutdown
//
// Shutdown asks the guest to sync and power off (or reboot). The guest
// answers ShutdownAck before it does. Ping is answered by Pong with the same
// payload. Error reports a frame the receiver rejected without ending the
// connection (for instance an Exec whose payload did not validate).
package agentproto
