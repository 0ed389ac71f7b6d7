package image

import (
	"errors"
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestCommandFor(t *testing.T) {
	py := &v1.Config{
		Entrypoint: []string{"/docker-entrypoint.sh"},
		Cmd:        []string{"python3"},
		Env:        []string{"PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"},
		WorkingDir: "/app",
		User:       "1000:1000",
	}
	cases := []struct {
		name string
		cfg  *v1.Config
		ov   Overrides
		want Command
		err  error
	}{
		{"image defaults", py, Overrides{},
			Command{Args: []string{"/docker-entrypoint.sh", "python3"}, Env: []string{"PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"}, Dir: "/app", User: "1000:1000"}, nil},
		{"cmd override keeps entrypoint", py, Overrides{Cmd: []string{"python3", "-V"}},
			Command{Args: []string{"/docker-entrypoint.sh", "python3", "-V"}, Env: []string{"PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"}, Dir: "/app", User: "1000:1000"}, nil},
		{"entrypoint override drops image cmd", py, Overrides{Entrypoint: []string{"/bin/sh"}, Env: []string{"LANG=en", "PYTHONUNBUFFERED", "X=1"}, WorkingDir: "/tmp", User: "root"},
			Command{Args: []string{"/bin/sh"}, Env: []string{"PATH=/usr/local/bin:/usr/bin", "LANG=en", "X=1"}, Dir: "/tmp", User: "root"}, nil},
		{"cleared entrypoint", py, Overrides{Entrypoint: []string{}, Cmd: []string{"ls", "-l"}},
			Command{Args: []string{"ls", "-l"}, Env: []string{"PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"}, Dir: "/app", User: "1000:1000"}, nil},
		{"no config", nil, Overrides{Cmd: []string{"echo", "hi"}},
			Command{Args: []string{"echo", "hi"}, Env: []string{"PATH=" + DefaultPath}, Dir: "/"}, nil},
		{"nothing to run", &v1.Config{Env: []string{"A=b"}}, Overrides{}, Command{}, ErrNoCommand},
		{"cleared everything", py, Overrides{Entrypoint: []string{}}, Command{}, ErrNoCommand},
		{"relative dir", nil, Overrides{Cmd: []string{"x"}, WorkingDir: "rel"}, Command{}, errAny},
		{"bad env", nil, Overrides{Cmd: []string{"x"}, Env: []string{"=v"}}, Command{}, errAny},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := CommandFor(c.cfg, c.ov)
			if c.err != nil {
				if err == nil || (c.err != errAny && !errors.Is(err, c.err)) {
					t.Fatalf("err = %v, want %v", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Args, c.want.Args) || !slices.Equal(got.Env, c.want.Env) || got.Dir != c.want.Dir || got.User != c.want.User {
				t.Fatalf("got %+v\nwant %+v", got, c.want)
			}
		})
	}
}
