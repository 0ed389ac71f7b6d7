package agentproto

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Limits on control payload contents, checked by Validate.
const (
	MaxArgs        = 4096 // argv entries
	MaxEnv         = 4096 // environment entries
	MaxHostnameLen = 64   // bytes, the Linux limit (HOST_NAME_MAX)
	MaxSignal      = 64   // highest signal number (SIGRTMAX on Linux)
	MaxMessage     = 4096 // bytes of a human-readable message
)

// Payload is a control payload: a JSON object that can check itself.
type Payload interface {
	// Validate reports whether the decoded payload is acceptable.
	Validate() error
}

// Encode marshals a control payload into a frame of type t for stream id.
// It validates p first, so a sender never sends what its peer would reject.
func Encode(t Type, id uint32, p Payload) (Frame, error) {
	if err := p.Validate(); err != nil {
		return Frame{}, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return Frame{}, frameErr(t, id, ErrBadPayload, "%v", err)
	}
	f := Frame{Type: t, ID: id, Payload: b}
	if len(b) > MaxPayload {
		return Frame{}, frameErr(t, id, ErrFrameTooLarge, "%d bytes", len(b))
	}
	return f, nil
}

// Decode unmarshals a frame's control payload into p and validates it.
func Decode(f Frame, p Payload) error {
	if err := json.Unmarshal(f.Payload, p); err != nil {
		return frameErr(f.Type, f.ID, ErrBadPayload, "%v", err)
	}
	if err := p.Validate(); err != nil {
		return frameErr(f.Type, f.ID, ErrBadPayload, "%v", err)
	}
	return nil
}

func checkString(what, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%s is %d bytes, at most %d", what, len(s), max)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("%s contains a NUL byte", what)
	}
	return nil
}

func checkEnv(env []string) error {
	if len(env) > MaxEnv {
		return fmt.Errorf("%d environment entries, at most %d", len(env), MaxEnv)
	}
	for i, e := range env {
		if err := checkString("environment entry", e, MaxPayload); err != nil {
			return err
		}
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("environment entry %d (%.40q) is not KEY=value", i, e)
		}
	}
	return nil
}

// Hello is the guest's first frame.
type Hello struct {
	Magic      string `json:"magic"`
	MinVersion int    `json:"min_version"`
	MaxVersion int    `json:"max_version"`
	Agent      string `json:"agent,omitempty"` // free-form agent build description
}

// Validate implements Payload.
func (h *Hello) Validate() error {
	if h.Magic != Magic {
		return fmt.Errorf("magic %.40q, want %q", h.Magic, Magic)
	}
	if h.MinVersion < 1 || h.MaxVersion < h.MinVersion {
		return fmt.Errorf("bad version range %d..%d", h.MinVersion, h.MaxVersion)
	}
	return checkString("agent", h.Agent, MaxMessage)
}

// Negotiate returns the highest version in both [min, max] ranges.
func Negotiate(peerMin, peerMax int) (int, error) {
	v := min(peerMax, Version)
	if v < max(peerMin, MinVersion) {
		return 0, fmt.Errorf("%w: peer speaks %d..%d, this side %d..%d", ErrVersion, peerMin, peerMax, MinVersion, Version)
	}
	return v, nil
}

// Config is the host's answer to Hello: the negotiated version and the
// guest's identity and clock.
type Config struct {
	Version      int      `json:"version"`
	TimeUnixNano int64    `json:"time_unix_nano"` // host wall clock; 0 leaves the guest clock alone
	Hostname     string   `json:"hostname,omitempty"`
	Env          []string `json:"env,omitempty"` // added to every exec's environment
	// Root, if set, boots the guest into an image (see RootConfig).
	Root *RootConfig `json:"root,omitempty"`
	// Net, if set, configures the network interface (see NetConfig).
	Net *NetConfig `json:"net,omitempty"`
}

// Validate implements Payload.
func (c *Config) Validate() error {
	if c.Version < MinVersion || c.Version > Version {
		return fmt.Errorf("version %d not in %d..%d", c.Version, MinVersion, Version)
	}
	if c.TimeUnixNano < 0 {
		return fmt.Errorf("negative time %d", c.TimeUnixNano)
	}
	if err := ValidHostname(c.Hostname); err != nil {
		return err
	}
	if c.Root != nil {
		if err := c.Root.Validate(); err != nil {
			return err
		}
	}
	if c.Net != nil {
		if err := c.Net.Validate(); err != nil {
			return err
		}
	}
	return checkEnv(c.Env)
}

// Ready is the guest's answer to Config: the agent is serving.
type Ready struct {
	Version  int      `json:"version"`
	Hostname string   `json:"hostname,omitempty"`
	Kernel   string   `json:"kernel,omitempty"`   // uname release
	Warnings []string `json:"warnings,omitempty"` // setup steps that failed but did not stop the agent
	// Failed is set when a setup step the sandbox cannot do without (the
	// root file system, the network) failed. The agent serves nothing
	// after it; the host reports it as a setup error.
	Failed string `json:"failed,omitempty"`
}

// Validate implements Payload.
func (r *Ready) Validate() error {
	if r.Version < MinVersion || r.Version > Version {
		return fmt.Errorf("version %d not in %d..%d", r.Version, MinVersion, Version)
	}
	if err := checkString("hostname", r.Hostname, MaxHostnameLen); err != nil {
		return err
	}
	if err := checkString("kernel", r.Kernel, MaxMessage); err != nil {
		return err
	}
	if err := checkString("failed", r.Failed, MaxMessage); err != nil {
		return err
	}
	if len(r.Warnings) > 64 {
		return fmt.Errorf("%d warnings, at most 64", len(r.Warnings))
	}
	for _, w := range r.Warnings {
		if err := checkString("warning", w, MaxMessage); err != nil {
			return err
		}
	}
	return nil
}

// ExecRequest starts a process in the guest.
type ExecRequest struct {
	Argv []string `json:"argv"`          // argv[0] is looked up in PATH unless it contains a slash
	Env  []string `json:"env,omitempty"` // merged over the guest's base environment
	Dir  string   `json:"dir,omitempty"` // working directory; "" is /
	UID  *uint32  `json:"uid,omitempty"` // nil: the agent's (root)
	GID  *uint32  `json:"gid,omitempty"`
	// User is a user spec resolved by the guest against its /etc/passwd
	// and /etc/group ("name", "uid", "uid:gid", "name:group"); it applies
	// where UID and GID are nil.
	User   string `json:"user,omitempty"`
	TTY    bool   `json:"tty,omitempty"` // a pseudo-terminal for stdin/stdout/stderr
	Rows   uint16 `json:"rows,omitempty"`
	Cols   uint16 `json:"cols,omitempty"`
	Stdin  bool   `json:"stdin,omitempty"`  // the host will send stdin; otherwise stdin is /dev/null (or an idle TTY)
	Window uint32 `json:"window,omitempty"` // stdout+stderr credit the host grants; 0 means DefaultWindow
}

// Validate implements Payload.
func (e *ExecRequest) Validate() error {
	if len(e.Argv) == 0 || e.Argv[0] == "" {
		return fmt.Errorf("empty argv")
	}
	if len(e.Argv) > MaxArgs {
		return fmt.Errorf("%d arguments, at most %d", len(e.Argv), MaxArgs)
	}
	for _, a := range e.Argv {
		if err := checkString("argument", a, MaxPayload); err != nil {
			return err
		}
	}
	if err := checkEnv(e.Env); err != nil {
		return err
	}
	if err := checkString("dir", e.Dir, 4096); err != nil {
		return err
	}
	if err := checkString("user", e.User, MaxUserSpec); err != nil {
		return err
	}
	if e.Window > MaxWindow {
		return fmt.Errorf("window %d, at most %d", e.Window, MaxWindow)
	}
	return nil
}

// Started tells the host a process runs.
type Started struct {
	PID    int    `json:"pid"`
	Window uint32 `json:"window,omitempty"` // stdin credit the guest grants
}

// Validate implements Payload.
func (s *Started) Validate() error {
	if s.PID <= 0 {
		return fmt.Errorf("pid %d", s.PID)
	}
	if s.Window > MaxWindow {
		return fmt.Errorf("window %d, at most %d", s.Window, MaxWindow)
	}
	return nil
}

// SpawnKind classifies why a process could not be started.
type SpawnKind int

// Spawn error kinds.
const (
	SpawnOther      SpawnKind = 1 // anything else; see Errno and Message
	SpawnNotFound   SpawnKind = 2 // the executable does not exist or is not in PATH
	SpawnPermission SpawnKind = 3 // the executable (or a directory on its path) is not executable
	SpawnBadDir     SpawnKind = 4 // the working directory does not exist or is not a directory
)

// String returns the kind's description.
func (k SpawnKind) String() string {
	switch k {
	case SpawnOther:
		return "other"
	case SpawnNotFound:
		return "not found"
	case SpawnPermission:
		return "permission denied"
	case SpawnBadDir:
		return "bad working directory"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// SpawnError tells the host a process could not be started.
type SpawnError struct {
	Kind    SpawnKind `json:"kind"`
	Errno   int       `json:"errno,omitempty"` // Linux errno, 0 if none
	Message string    `json:"message,omitempty"`
}

// Validate implements Payload.
func (s *SpawnError) Validate() error {
	if s.Kind < SpawnOther || s.Kind > SpawnBadDir {
		return fmt.Errorf("unknown spawn error kind %d", s.Kind)
	}
	if s.Errno < 0 || s.Errno > 4095 {
		return fmt.Errorf("errno %d out of range", s.Errno)
	}
	return checkString("message", s.Message, MaxMessage)
}

// Resize sets a TTY's window size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Validate implements Payload.
func (r *Resize) Validate() error { return nil }

// Signal delivers a signal to a process.
type Signal struct {
	Signal int  `json:"signal"`          // Linux signal number
	Group  bool `json:"group,omitempty"` // signal the process group (the exec is a session leader), not just the process
}

// Validate implements Payload.
func (s *Signal) Validate() error {
	if s.Signal < 1 || s.Signal > MaxSignal {
		return fmt.Errorf("signal %d not in 1..%d", s.Signal, MaxSignal)
	}
	return nil
}

// Exit tells the host a process ended. Exactly one of Code and Signal is
// meaningful: Signal is non-zero when the process was killed by a signal.
type Exit struct {
	Code   int  `json:"code"`
	Signal int  `json:"signal,omitempty"`
	Core   bool `json:"core,omitempty"`
}

// Validate implements Payload.
func (e *Exit) Validate() error {
	if e.Signal < 0 || e.Signal > MaxSignal {
		return fmt.Errorf("signal %d not in 0..%d", e.Signal, MaxSignal)
	}
	if e.Code < 0 || e.Code > 255 {
		return fmt.Errorf("exit code %d not in 0..255", e.Code)
	}
	if e.Signal != 0 && e.Code != 0 {
		return fmt.Errorf("both exit code %d and signal %d", e.Code, e.Signal)
	}
	return nil
}

// Shutdown asks the guest to power off (or reboot).
type Shutdown struct {
	Reboot bool `json:"reboot,omitempty"`
}

// Validate implements Payload.
func (s *Shutdown) Validate() error { return nil }

// Error codes carried by ErrorInfo.
const (
	ErrorCodeProtocol = 1 // the frame broke the protocol
	ErrorCodeBusy     = 2 // too many streams
	ErrorCodeInternal = 3 // the receiver failed
)

// ErrorInfo reports a rejected frame without ending the connection.
type ErrorInfo struct {
	Code    int    `json:"code"`
	Message string `json:"message,omitempty"`
}

// Validate implements Payload.
func (e *ErrorInfo) Validate() error {
	if e.Code < 1 || e.Code > 255 {
		return fmt.Errorf("error code %d", e.Code)
	}
	return checkString("message", e.Message, MaxMessage)
}

// ValidHostname reports whether s is acceptable as a guest hostname: at most
// 64 bytes, valid UTF-8, no NUL or '/'. The empty string means "leave the
// hostname alone".
func ValidHostname(s string) error {
	if err := checkString("hostname", s, MaxHostnameLen); err != nil {
		return err
	}
	if !utf8.ValidString(s) || strings.ContainsRune(s, '/') {
		return fmt.Errorf("hostname %q is not valid", s)
	}
	return nil
}

// Hostname derives a guest hostname from a sandbox name (which may be up
// to 128 UTF-8 bytes or longer). The result is a valid DNS-style label
// sequence of at most 64 bytes:
//   - ASCII letters are lower-cased; ASCII digits, '-' and '.' are kept;
//   - every other rune (including any non-ASCII rune, '_' and spaces)
//     becomes '-', and runs of '-' collapse into one;
//   - leading and trailing '-' and '.' are trimmed;
//   - the result is cut to 64 bytes (all ASCII, so no rune is split) and
//     trimmed again;
//   - an empty result becomes "sandbox".
func Hostname(name string) string {
	var b strings.Builder
	dash := false
	for _, r := range name {
		switch {
		case r >= 'A' && r <= 'Z':
			r += 'a' - 'A'
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '.':
		default:
			r = '-'
		}
		if r == '-' {
			if dash {
				continue
			}
			dash = true
		} else {
			dash = false
		}
		b.WriteRune(r)
		if b.Len() >= 2*MaxHostnameLen {
			break
		}
	}
	s := strings.Trim(b.String(), "-.")
	if len(s) > MaxHostnameLen {
		s = strings.Trim(s[:MaxHostnameLen], "-.")
	}
	if s == "" {
		return "sandbox"
	}
	return s
}
