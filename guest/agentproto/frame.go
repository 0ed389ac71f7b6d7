package agentproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Version is the newest protocol version this package speaks.
const Version = 1

// MinVersion is the oldest protocol version this package speaks.
const MinVersion = 1

// Magic is the string the guest's Hello carries.
const Magic = "gosandbox-agent"

// HeaderSize is the size of a frame header in bytes.
const HeaderSize = 12

// MaxPayload is the largest payload a frame may carry.
const MaxPayload = 1 << 20

// MaxData is the largest payload of a data frame (Stdin, Stdout, Stderr).
const MaxData = 64 << 10

// MaxPing is the largest payload of a Ping or Pong frame.
const MaxPing = 64

// DefaultWindow is the credit window each side grants per stream unless
// configured otherwise.
const DefaultWindow = 256 << 10

// MaxWindow is the largest credit a receiver may grant per stream; a
// sender that is granted more treats it as a protocol error.
const MaxWindow = 64 << 20

// frameMagic is the first two bytes of every frame ("GS").
const frameMagic uint16 = 0x5347

// Type is a frame type.
type Type uint8

// Frame types. The comment says who sends it and what the payload is.
const (
	TypeHello       Type = 1  // guest→host, id 0, Hello
	TypeConfig      Type = 2  // host→guest, id 0, Config
	TypeReady       Type = 3  // guest→host, id 0, Ready
	TypeExec        Type = 4  // host→guest, stream, ExecRequest
	TypeStarted     Type = 5  // guest→host, stream, Started
	TypeSpawnError  Type = 6  // guest→host, stream, SpawnError
	TypeStdin       Type = 7  // host→guest, stream, raw bytes
	TypeStdinClose  Type = 8  // host→guest, stream, empty
	TypeStdout      Type = 9  // guest→host, stream, raw bytes
	TypeStderr      Type = 10 // guest→host, stream, raw bytes
	TypeResize      Type = 11 // host→guest, stream, Resize
	TypeSignal      Type = 12 // host→guest, stream, Signal
	TypeExit        Type = 13 // guest→host, stream, Exit
	TypeWindow      Type = 14 // both, stream, 4-byte credit increment
	TypeShutdown    Type = 15 // host→guest, id 0, Shutdown
	TypeShutdownAck Type = 16 // guest→host, id 0, empty
	TypePing        Type = 17 // host→guest, id 0, up to MaxPing bytes
	TypePong        Type = 18 // guest→host, id 0, the Ping's bytes
	TypeError       Type = 19 // both, any id, ErrorInfo
	typeMax         Type = 19
)

var typeNames = [...]string{
	TypeHello: "hello", TypeConfig: "config", TypeReady: "ready", TypeExec: "exec",
	TypeStarted: "started", TypeSpawnError: "spawn-error", TypeStdin: "stdin",
	TypeStdinClose: "stdin-close", TypeStdout: "stdout", TypeStderr: "stderr",
	TypeResize: "resize", TypeSignal: "signal", TypeExit: "exit", TypeWindow: "window",
	TypeShutdown: "shutdown", TypeShutdownAck: "shutdown-ack", TypePing: "ping",
	TypePong: "pong", TypeError: "error",
}

// String returns the type's name, or "type(N)" for an unknown type.
func (t Type) String() string {
	if t >= 1 && t <= typeMax {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Direction says which side sent a frame.
type Direction uint8

// Directions.
const (
	FromHost  Direction = 1 // sent by the host, received by the guest
	FromGuest Direction = 2 // sent by the guest, received by the host
)

// String returns "host" or "guest".
func (d Direction) String() string {
	switch d {
	case FromHost:
		return "host"
	case FromGuest:
		return "guest"
	}
	return "unknown"
}

type typeInfo struct {
	dir    Direction // 0: both directions
	stream bool      // id must be non-zero (else must be zero)
	anyID  bool      // id is not checked
	maxLen int       // payload limit
	minLen int
}

var typeInfos = [...]typeInfo{
	TypeHello:       {dir: FromGuest, maxLen: MaxPayload},
	TypeConfig:      {dir: FromHost, maxLen: MaxPayload},
	TypeReady:       {dir: FromGuest, maxLen: MaxPayload},
	TypeExec:        {dir: FromHost, stream: true, maxLen: MaxPayload},
	TypeStarted:     {dir: FromGuest, stream: true, maxLen: MaxPayload},
	TypeSpawnError:  {dir: FromGuest, stream: true, maxLen: MaxPayload},
	TypeStdin:       {dir: FromHost, stream: true, maxLen: MaxData},
	TypeStdinClose:  {dir: FromHost, stream: true, maxLen: 0},
	TypeStdout:      {dir: FromGuest, stream: true, maxLen: MaxData},
	TypeStderr:      {dir: FromGuest, stream: true, maxLen: MaxData},
	TypeResize:      {dir: FromHost, stream: true, maxLen: MaxPayload},
	TypeSignal:      {dir: FromHost, stream: true, maxLen: MaxPayload},
	TypeExit:        {dir: FromGuest, stream: true, maxLen: MaxPayload},
	TypeWindow:      {stream: true, minLen: 4, maxLen: 4},
	TypeShutdown:    {dir: FromHost, maxLen: MaxPayload},
	TypeShutdownAck: {dir: FromGuest, maxLen: 0},
	TypePing:        {dir: FromHost, maxLen: MaxPing},
	TypePong:        {dir: FromGuest, maxLen: MaxPing},
	TypeError:       {anyID: true, maxLen: MaxPayload},
}

// Errors. Every error this package returns for bad input wraps ErrProtocol,
// and one of the more specific errors below.
var (
	// ErrProtocol means the peer broke the protocol; the connection
	// cannot be trusted any more.
	ErrProtocol = errors.New("agentproto: protocol error")

	ErrBadMagic       = fmt.Errorf("%w: bad frame magic (is the other side a gosandbox agent?)", ErrProtocol)
	ErrUnknownType    = fmt.Errorf("%w: unknown frame type", ErrProtocol)
	ErrWrongDirection = fmt.Errorf("%w: frame sent in the wrong direction", ErrProtocol)
	ErrBadID          = fmt.Errorf("%w: bad stream id", ErrProtocol)
	ErrBadFlags       = fmt.Errorf("%w: reserved flags set", ErrProtocol)
	ErrFrameTooLarge  = fmt.Errorf("%w: frame payload too large", ErrProtocol)
	ErrBadPayload     = fmt.Errorf("%w: bad payload", ErrProtocol)
	ErrVersion        = fmt.Errorf("%w: no protocol version in common (update the host library or the guest agent so they match)", ErrProtocol)
)

// FrameError is the error for a frame that failed validation. It unwraps
// to one of the package's sentinel errors (and so to ErrProtocol).
type FrameError struct {
	Type   Type
	ID     uint32
	Reason string
	Err    error
}

// Error implements error.
func (e *FrameError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("%v (frame %v, id %d)", e.Err, e.Type, e.ID)
	}
	return fmt.Sprintf("%v (frame %v, id %d): %s", e.Err, e.Type, e.ID, e.Reason)
}

// Unwrap returns the sentinel error.
func (e *FrameError) Unwrap() error { return e.Err }

func frameErr(t Type, id uint32, err error, format string, args ...any) error {
	return &FrameError{Type: t, ID: id, Err: err, Reason: fmt.Sprintf(format, args...)}
}

// Frame is one protocol message.
type Frame struct {
	Type    Type
	Flags   uint8
	ID      uint32
	Payload []byte
}

// Header is a decoded frame header.
type Header struct {
	Type   Type
	Flags  uint8
	ID     uint32
	Length uint32
}

// ParseHeader decodes and validates a frame header as received from dir.
func ParseHeader(b [HeaderSize]byte, dir Direction) (Header, error) {
	h := Header{
		Type:   Type(b[2]),
		Flags:  b[3],
		ID:     binary.LittleEndian.Uint32(b[4:8]),
		Length: binary.LittleEndian.Uint32(b[8:12]),
	}
	if binary.LittleEndian.Uint16(b[0:2]) != frameMagic {
		return h, frameErr(h.Type, h.ID, ErrBadMagic, "got %#02x %#02x", b[0], b[1])
	}
	if h.Type < 1 || h.Type > typeMax {
		return h, frameErr(h.Type, h.ID, ErrUnknownType, "")
	}
	ti := typeInfos[h.Type]
	if ti.dir != 0 && dir != 0 && ti.dir != dir {
		return h, frameErr(h.Type, h.ID, ErrWrongDirection, "a %v frame must come from the %v", h.Type, ti.dir)
	}
	if h.Flags != 0 {
		return h, frameErr(h.Type, h.ID, ErrBadFlags, "flags %#x", h.Flags)
	}
	if !ti.anyID {
		if ti.stream && h.ID == 0 {
			return h, frameErr(h.Type, h.ID, ErrBadID, "stream frames need a non-zero id")
		}
		if !ti.stream && h.ID != 0 {
			return h, frameErr(h.Type, h.ID, ErrBadID, "connection frames need id 0")
		}
	}
	if h.Length > uint32(ti.maxLen) {
		return h, frameErr(h.Type, h.ID, ErrFrameTooLarge, "%d bytes, at most %d", h.Length, ti.maxLen)
	}
	if h.Length < uint32(ti.minLen) {
		return h, frameErr(h.Type, h.ID, ErrBadPayload, "%d bytes, at least %d", h.Length, ti.minLen)
	}
	return h, nil
}

// Validate checks a frame as it would be checked on receipt from dir.
func (f *Frame) Validate(dir Direction) error {
	if len(f.Payload) > MaxPayload {
		return frameErr(f.Type, f.ID, ErrFrameTooLarge, "%d bytes", len(f.Payload))
	}
	var b [HeaderSize]byte
	f.putHeader(&b)
	_, err := ParseHeader(b, dir)
	return err
}

func (f *Frame) putHeader(b *[HeaderSize]byte) {
	binary.LittleEndian.PutUint16(b[0:2], frameMagic)
	b[2] = byte(f.Type)
	b[3] = f.Flags
	binary.LittleEndian.PutUint32(b[4:8], f.ID)
	binary.LittleEndian.PutUint32(b[8:12], uint32(len(f.Payload)))
}

// AppendFrame appends the encoding of f to dst. It does not validate f; the
// sender should (Validate), so a bug on one side is caught there first.
func AppendFrame(dst []byte, f *Frame) []byte {
	var b [HeaderSize]byte
	f.putHeader(&b)
	dst = append(dst, b[:]...)
	return append(dst, f.Payload...)
}

// Reader reads frames from a byte stream and validates them.
type Reader struct {
	r   io.Reader
	dir Direction
	hdr [HeaderSize]byte
}

// NewReader returns a Reader of frames sent from dir (the peer's side).
func NewReader(r io.Reader, dir Direction) *Reader {
	return &Reader{r: r, dir: dir}
}

// ReadFrame reads and validates the next frame. It returns io.EOF on a clean
// end of stream between frames, io.ErrUnexpectedEOF for a stream cut inside
// a frame, and a *FrameError (ErrProtocol) for an invalid frame. The payload
// is freshly allocated and owned by the caller.
func (r *Reader) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		return Frame{}, err
	}
	h, err := ParseHeader(r.hdr, r.dir)
	if err != nil {
		return Frame{}, err
	}
	f := Frame{Type: h.Type, Flags: h.Flags, ID: h.ID}
	if h.Length > 0 {
		f.Payload = make([]byte, h.Length)
		if _, err := io.ReadFull(r.r, f.Payload); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return Frame{}, err
		}
	}
	return f, nil
}

// WindowPayload encodes a credit increment.
func WindowPayload(n uint32) []byte {
	return binary.LittleEndian.AppendUint32(nil, n)
}

// ParseWindow decodes and checks a Window frame's credit increment.
func ParseWindow(f Frame) (uint32, error) {
	if f.Type != TypeWindow || len(f.Payload) != 4 {
		return 0, frameErr(f.Type, f.ID, ErrBadPayload, "not a window frame")
	}
	n := binary.LittleEndian.Uint32(f.Payload)
	if n == 0 || n > MaxWindow {
		return 0, frameErr(f.Type, f.ID, ErrBadPayload, "credit %d out of range 1..%d", n, MaxWindow)
	}
	return n, nil
}
