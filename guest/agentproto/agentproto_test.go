package agentproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

func seedFrames() []Frame {
	uid := uint32(1000)
	enc := func(t Type, id uint32, p Payload) Frame {
		f, err := Encode(t, id, p)
		if err != nil {
			panic(err)
		}
		return f
	}
	return []Frame{
		enc(TypeHello, 0, &Hello{Magic: Magic, MinVersion: 1, MaxVersion: 1, Agent: "test"}),
		enc(TypeConfig, 0, &Config{Version: 1, TimeUnixNano: 1e18, Hostname: "box", Env: []string{"A=b"}}),
		enc(TypeReady, 0, &Ready{Version: 1, Hostname: "box", Kernel: "7.1"}),
		enc(TypeExec, 1, &ExecRequest{Argv: []string{"sh", "-c", "echo hi"}, Env: []string{"X=1"}, Dir: "/tmp", UID: &uid, TTY: true, Rows: 24, Cols: 80, Stdin: true}),
		enc(TypeStarted, 1, &Started{PID: 42, Window: DefaultWindow}),
		enc(TypeSpawnError, 2, &SpawnError{Kind: SpawnNotFound, Errno: 2, Message: "nope"}),
		{Type: TypeStdin, ID: 1, Payload: []byte("input")},
		{Type: TypeStdinClose, ID: 1},
		{Type: TypeStdout, ID: 1, Payload: []byte("out")},
		{Type: TypeStderr, ID: 1, Payload: []byte("err")},
		enc(TypeResize, 1, &Resize{Rows: 50, Cols: 132}),
		enc(TypeSignal, 1, &Signal{Signal: 9}),
		enc(TypeExit, 1, &Exit{Code: 3}),
		enc(TypeExit, 1, &Exit{Signal: 15}),
		{Type: TypeWindow, ID: 1, Payload: WindowPayload(4096)},
		enc(TypeShutdown, 0, &Shutdown{}),
		{Type: TypeShutdownAck},
		{Type: TypePing, Payload: []byte("12345678")},
		{Type: TypePong, Payload: []byte("12345678")},
		enc(TypeError, 7, &ErrorInfo{Code: ErrorCodeProtocol, Message: "bad"}),
	}
}

func dirOf(t Type) Direction {
	if d := typeInfos[t].dir; d != 0 {
		return d
	}
	return FromHost
}

func TestRoundTrip(t *testing.T) {
	for _, f := range seedFrames() {
		dir := dirOf(f.Type)
		if err := f.Validate(dir); err != nil {
			t.Fatalf("Validate(%v) = %v", f.Type, err)
		}
		b := AppendFrame(nil, &f)
		got, err := NewReader(bytes.NewReader(b), dir).ReadFrame()
		if err != nil {
			t.Fatalf("ReadFrame(%v) = %v", f.Type, err)
		}
		if got.Type != f.Type || got.ID != f.ID || !bytes.Equal(got.Payload, f.Payload) {
			t.Errorf("ReadFrame = %+v, want %+v", got, f)
		}
		if err := checkPayload(got); err != nil {
			t.Errorf("payload of %v: %v", f.Type, err)
		}
	}
}

// checkPayload decodes a frame's payload by its type.
func checkPayload(f Frame) error {
	var p Payload
	switch f.Type {
	case TypeHello:
		p = new(Hello)
	case TypeConfig:
		p = new(Config)
	case TypeReady:
		p = new(Ready)
	case TypeExec:
		p = new(ExecRequest)
	case TypeStarted:
		p = new(Started)
	case TypeSpawnError:
		p = new(SpawnError)
	case TypeResize:
		p = new(Resize)
	case TypeSignal:
		p = new(Signal)
	case TypeExit:
		p = new(Exit)
	case TypeShutdown:
		p = new(Shutdown)
	case TypeError:
		p = new(ErrorInfo)
	case TypeWindow:
		_, err := ParseWindow(f)
		return err
	default:
		return nil
	}
	return Decode(f, p)
}

func TestBadFrames(t *testing.T) {
	good := AppendFrame(nil, &Frame{Type: TypeStdout, ID: 1, Payload: []byte("x")})
	mod := func(f func(b []byte)) []byte {
		b := bytes.Clone(good)
		f(b)
		return b
	}
	tests := []struct {
		name string
		in   []byte
		dir  Direction
		want error
	}{
		{"magic", mod(func(b []byte) { b[0] = 'X' }), FromGuest, ErrBadMagic},
		{"unknown type", mod(func(b []byte) { b[2] = 200 }), FromGuest, ErrUnknownType},
		{"type zero", mod(func(b []byte) { b[2] = 0 }), FromGuest, ErrUnknownType},
		{"direction", good, FromHost, ErrWrongDirection},
		{"flags", mod(func(b []byte) { b[3] = 1 }), FromGuest, ErrBadFlags},
		{"id zero", mod(func(b []byte) { b[4] = 0 }), FromGuest, ErrBadID},
		{"too large", mod(func(b []byte) { b[11] = 0x10 }), FromGuest, ErrFrameTooLarge},
		{"window short", AppendFrame(nil, &Frame{Type: TypeWindow, ID: 1, Payload: []byte{1}}), FromGuest, ErrBadPayload},
		{"connection id", AppendFrame(nil, &Frame{Type: TypePing, ID: 3}), FromHost, ErrBadID},
	}
	for _, tt := range tests {
		_, err := NewReader(bytes.NewReader(tt.in), tt.dir).ReadFrame()
		if !errors.Is(err, tt.want) || !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: ReadFrame = %v, want %v", tt.name, err, tt.want)
		}
		var fe *FrameError
		if !errors.As(err, &fe) {
			t.Errorf("%s: error %T is not a *FrameError", tt.name, err)
		}
	}
	// Truncation inside a frame is ErrUnexpectedEOF, a clean end is EOF.
	if _, err := NewReader(bytes.NewReader(good[:len(good)-1]), FromGuest).ReadFrame(); err != io.ErrUnexpectedEOF {
		t.Errorf("truncated payload: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, err := NewReader(bytes.NewReader(good[:5]), FromGuest).ReadFrame(); err != io.ErrUnexpectedEOF {
		t.Errorf("truncated header: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, err := NewReader(bytes.NewReader(nil), FromGuest).ReadFrame(); err != io.EOF {
		t.Errorf("empty: %v, want io.EOF", err)
	}
}

func TestBadPayloads(t *testing.T) {
	tests := []struct {
		t Type
		p Payload
	}{
		{TypeHello, &Hello{Magic: "x", MinVersion: 1, MaxVersion: 1}},
		{TypeHello, &Hello{Magic: Magic, MinVersion: 2, MaxVersion: 1}},
		{TypeConfig, &Config{Version: 99}},
		{TypeConfig, &Config{Version: 1, Hostname: strings.Repeat("a", 65)}},
		{TypeConfig, &Config{Version: 1, Env: []string{"NOEQUALS"}}},
		{TypeConfig, &Config{Version: 1, Env: []string{"=x"}}},
		{TypeExec, &ExecRequest{}},
		{TypeExec, &ExecRequest{Argv: []string{"a\x00b"}}},
		{TypeExec, &ExecRequest{Argv: []string{"a"}, Window: MaxWindow + 1}},
		{TypeStarted, &Started{PID: 0}},
		{TypeSpawnError, &SpawnError{Kind: 9}},
		{TypeSignal, &Signal{Signal: 0}},
		{TypeSignal, &Signal{Signal: 65}},
		{TypeExit, &Exit{Code: 256}},
		{TypeExit, &Exit{Code: 1, Signal: 9}},
		{TypeError, &ErrorInfo{}},
	}
	for _, tt := range tests {
		if _, err := Encode(tt.t, 1, tt.p); err == nil {
			t.Errorf("Encode(%v, %+v) = nil error, want one", tt.t, tt.p)
		}
	}
	// Decoding garbage JSON or an invalid struct is ErrBadPayload.
	for _, payload := range []string{"{", "[]", `{"kind":"x"}`, `{"signal":-1}`} {
		err := Decode(Frame{Type: TypeSignal, ID: 1, Payload: []byte(payload)}, new(Signal))
		if !errors.Is(err, ErrBadPayload) {
			t.Errorf("Decode(%q) = %v, want ErrBadPayload", payload, err)
		}
	}
}

func TestNegotiate(t *testing.T) {
	if v, err := Negotiate(1, 5); err != nil || v != Version {
		t.Errorf("Negotiate(1, 5) = %d, %v; want %d", v, err, Version)
	}
	if _, err := Negotiate(Version+1, Version+3); !errors.Is(err, ErrVersion) {
		t.Errorf("Negotiate(future) = %v, want ErrVersion", err)
	}
}

func TestHostname(t *testing.T) {
	tests := []struct{ in, want string }{
		{"my-box", "my-box"},
		{"My Box_1", "my-box-1"},
		{"", "sandbox"},
		{"---", "sandbox"},
		{"über/sandbox", "ber-sandbox"},
		{"日本語", "sandbox"},
		{"a..b", "a..b"},
		{strings.Repeat("ab", 64), strings.Repeat("ab", 32)},
		{strings.Repeat("é", 64), "sandbox"},
		{strings.Repeat("a", 63) + "-bcd", strings.Repeat("a", 63)},
	}
	for _, tt := range tests {
		got := Hostname(tt.in)
		if got != tt.want {
			t.Errorf("Hostname(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if err := ValidHostname(got); err != nil || len(got) > MaxHostnameLen {
			t.Errorf("Hostname(%q) = %q is not valid: %v", tt.in, got, err)
		}
	}
}

func FuzzHostname(f *testing.F) {
	f.Add("my sandbox")
	f.Add(strings.Repeat("ü", 100))
	f.Fuzz(func(t *testing.T, name string) {
		h := Hostname(name)
		if len(h) == 0 || len(h) > MaxHostnameLen || !utf8.ValidString(h) || ValidHostname(h) != nil {
			t.Fatalf("Hostname(%q) = %q", name, h)
		}
	})
}

// FuzzDecodeFrame feeds arbitrary bytes to the frame reader, as either side
// would receive them, and decodes every accepted frame's payload. Nothing may
// panic, and every accepted frame must re-encode to the same bytes.
func FuzzDecodeFrame(f *testing.F) {
	for _, fr := range seedFrames() {
		f.Add(AppendFrame(nil, &fr), uint8(dirOf(fr.Type)))
	}
	f.Add([]byte("GS\x04\x00\x01\x00\x00\x00\xff\xff\xff\xff"), uint8(FromHost))
	f.Fuzz(func(t *testing.T, data []byte, d uint8) {
		dir := Direction(d%2 + 1)
		r := NewReader(bytes.NewReader(data), dir)
		var off int
		for {
			fr, err := r.ReadFrame()
			if err != nil {
				if err != io.EOF && err != io.ErrUnexpectedEOF && !errors.Is(err, ErrProtocol) {
					t.Fatalf("ReadFrame: untyped error %v", err)
				}
				return
			}
			enc := AppendFrame(nil, &fr)
			if !bytes.Equal(enc, data[off:off+len(enc)]) {
				t.Fatalf("re-encoding differs")
			}
			off += len(enc)
			if err := fr.Validate(dir); err != nil {
				t.Fatalf("accepted frame fails Validate: %v", err)
			}
			if err := checkPayload(fr); err != nil && !errors.Is(err, ErrProtocol) {
				t.Fatalf("payload: untyped error %v", err)
			}
		}
	})
}
