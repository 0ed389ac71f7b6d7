package image

import (
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// DefaultPath is the PATH a command gets when neither the image nor the
// overrides set one (the value Docker uses).
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Overrides are the caller's changes to an image's default command.
// Nil slices and empty strings keep the image's value.
type Overrides struct {
	// Entrypoint replaces the image Entrypoint. A non-nil empty slice
	// clears it. Setting it also drops the image Cmd (as docker run
	// --entrypoint does) unless Cmd is set too.
	Entrypoint []string
	// Cmd replaces the image Cmd (the arguments after the entrypoint).
	Cmd []string
	// Env entries ("KEY=value") are added to the image's; a key present
	// in both takes the override's value. An entry without "=" removes
	// that key.
	Env []string
	// WorkingDir replaces the image WorkingDir; must be absolute.
	WorkingDir string
	// User replaces the image User ("name", "uid", "uid:gid",
	// "name:group").
	User string
}

// Command is what the guest agent should exec.
type Command struct {
	// Args is argv; Args[0] is resolved against PATH in the guest if it
	// has no slash.
	Args []string
	// Env is the environment, "KEY=value", with PATH always set.
	Env []string
	// Dir is the absolute working directory ("/" by default).
	Dir string
	// User is the user spec to switch to, resolved in the guest against
	// the image's /etc/passwd and /etc/group ("" or "root" mean 0:0).
	User string
}

// CommandFor applies an image config and overrides the way docker run
// does: argv = Entrypoint + Cmd, env merged with PATH defaulted, working
// directory defaulted to "/". cfg may be nil (an image without a config).
// It fails with ErrNoCommand when argv would be empty.
func CommandFor(cfg *v1.Config, ov Overrides) (Command, error) {
	var img v1.Config
	if cfg != nil {
		img = *cfg
	}
	entry, cmd := img.Entrypoint, img.Cmd
	if ov.Entrypoint != nil {
		entry = ov.Entrypoint
		cmd = nil
	}
	if ov.Cmd != nil {
		cmd = ov.Cmd
	}
	c := Command{Args: append(append([]string{}, entry...), cmd...)}
	if len(c.Args) == 0 || c.Args[0] == "" {
		return Command{}, ErrNoCommand
	}

	var keys []string
	vals := map[string]string{}
	set := func(kv string, override bool) error {
		k, v, ok := strings.Cut(kv, "=")
		if k == "" || strings.ContainsRune(k, 0) || strings.ContainsRune(v, 0) {
			return fmt.Errorf("image: invalid environment entry %q: want KEY=value", kv)
		}
		if !ok {
			if override {
				delete(vals, k)
			}
			return nil
		}
		if _, seen := vals[k]; !seen {
			keys = append(keys, k)
		}
		vals[k] = v
		return nil
	}
	for _, kv := range img.Env {
		if err := set(kv, false); err != nil {
			return Command{}, fmt.Errorf("%w: %v", ErrInvalidManifest, err)
		}
	}
	for _, kv := range ov.Env {
		if err := set(kv, true); err != nil {
			return Command{}, err
		}
	}
	if _, ok := vals["PATH"]; !ok {
		keys = append(keys, "PATH")
		vals["PATH"] = DefaultPath
	}
	for _, k := range keys {
		if v, ok := vals[k]; ok {
			c.Env = append(c.Env, k+"="+v)
		}
	}

	c.Dir = img.WorkingDir
	if ov.WorkingDir != "" {
		c.Dir = ov.WorkingDir
	}
	if c.Dir == "" {
		c.Dir = "/"
	}
	if !strings.HasPrefix(c.Dir, "/") {
		return Command{}, fmt.Errorf("image: working directory %q is not absolute", c.Dir)
	}
	c.User = img.User
	if ov.User != "" {
		c.User = ov.User
	}
	return c, nil
}
