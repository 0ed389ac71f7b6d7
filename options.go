package sandbox

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"unicode/utf8"

	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/netstack"
)

// Defaults for options not given.
const (
	DefaultMemory = 512 << 20
	DefaultCPUs   = 1
	// MaxNameBytes is the longest sandbox name accepted (UTF-8 bytes).
	MaxNameBytes = 128
)

// Option configures New. Options are checked when New applies them: an
// invalid one makes New return an error matching ErrInvalidOption.
type Option func(*config) error

type config struct {
	kernelPath string
	memory     uint64
	cpus       int
	name       string
	env        []string
	workDir    string
	console    io.Writer
	logger     *slog.Logger
	cmdline    string

	imageRef  string
	pullOpts  []image.PullOption
	img       *image.Image
	store     *image.Store
	diskSize  int64
	tmpfsSize uint64
	lazy      bool

	noNetwork bool
	netSet    bool
	net       netstack.Config
}

func defaultConfig() config {
	return config{memory: DefaultMemory, cpus: DefaultCPUs, logger: slog.New(slog.DiscardHandler)}
}

// ErrInvalidOption is matched by every *OptionError.
var ErrInvalidOption = errors.New("sandbox: invalid option")

// OptionError reports an option New cannot use.
type OptionError struct {
	Option string
	Why    string
}

func (e *OptionError) Error() string { return "sandbox: option " + e.Option + ": " + e.Why }

// Is makes errors.Is(err, ErrInvalidOption) true.
func (e *OptionError) Is(target error) bool { return target == ErrInvalidOption }

// Kernel boots the given kernel file (a bzImage or an uncompressed vmlinux
// ELF) instead of the default one.
func Kernel(path string) Option {
	return func(c *config) error {
		if path == "" {
			return &OptionError{"Kernel", "empty path"}
		}
		c.kernelPath = path
		return nil
	}
}

// Memory sets the guest RAM in bytes (a multiple of 4096, at least 64 MiB).
// The default is 512 MiB; host memory is used only as the guest touches it.
func Memory(bytes uint64) Option {
	return func(c *config) error {
		if bytes < 64<<20 || bytes%4096 != 0 {
			return &OptionError{"Memory", fmt.Sprintf("%d bytes: want a multiple of 4096, at least 64 MiB", bytes)}
		}
		c.memory = bytes
		return nil
	}
}

// CPUs sets the number of virtual CPUs (1 to 32).
func CPUs(n int) Option {
	return func(c *config) error {
		if n < 1 || n > 32 {
			return &OptionError{"CPUs", fmt.Sprintf("%d: want 1 to 32", n)}
		}
		c.cpus = n
		return nil
	}
}

// Name names the sandbox (at most 128 bytes of UTF-8). The guest's hostname
// is derived from it (lower-cased, other characters replaced by '-', at
// most 64 bytes).
func Name(name string) Option {
	return func(c *config) error {
		switch {
		case !utf8.ValidString(name):
			return &OptionError{"Name", "not valid UTF-8"}
		case len(name) > MaxNameBytes:
			return &OptionError{"Name", fmt.Sprintf("%d bytes: at most %d", len(name), MaxNameBytes)}
		case strings.ContainsRune(name, 0):
			return &OptionError{"Name", "contains NUL"}
		}
		c.name = name
		return nil
	}
}

// Env adds environment variables ("KEY=value") for every command.
func Env(kv ...string) Option {
	return func(c *config) error {
		for _, e := range kv {
			k, _, ok := strings.Cut(e, "=")
			if !ok || k == "" || strings.ContainsRune(e, 0) {
				return &OptionError{"Env", fmt.Sprintf("%q: want KEY=value", e)}
			}
		}
		c.env = append(c.env, kv...)
		return nil
	}
}

// WorkDir sets the default working directory of commands (an absolute path
// in the guest).
func WorkDir(dir string) Option {
	return func(c *config) error {
		if !strings.HasPrefix(dir, "/") {
			return &OptionError{"WorkDir", fmt.Sprintf("%q: want an absolute path", dir)}
		}
		c.workDir = dir
		return nil
	}
}

// Console receives the guest's console (kernel messages and the init's
// log). A slow writer slows the guest. The default discards it; the tail
// is kept for error messages either way.
func Console(w io.Writer) Option {
	return func(c *config) error {
		c.console = w
		return nil
	}
}

// Logger receives the library's debug records. The default is silent.
func Logger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return &OptionError{"Logger", "nil logger"}
		}
		c.logger = l
		return nil
	}
}

// KernelArgs appends parameters to the guest kernel's command line.
func KernelArgs(args string) Option {
	return func(c *config) error {
		if strings.ContainsAny(args, "\x00\n") {
			return &OptionError{"KernelArgs", "contains NUL or newline"}
		}
		c.cmdline = strings.TrimSpace(c.cmdline + " " + args)
		return nil
	}
}
