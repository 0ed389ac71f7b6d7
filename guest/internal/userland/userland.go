// Package userland is the default guest userland: a shell and the core
// commands, linked into the guest's one multi-call binary (the way busybox
// is) so the initramfs carries one Go runtime instead of one per command.
//
// The shell is mvdan.cc/sh's POSIX interpreter (u-root's gosh is the same
// interpreter behind a line editor). File commands come from u-root's
// pkg/core (cat, ls, cp, mv, rm, mkdir, touch, chmod, find, base64, mktemp,
// xargs, shasum). The rest are small enough that writing them here is
// simpler than another dependency: u-root keeps them as `package main`
// commands under cmds/core, which cannot be imported.
package userland

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/u-root/u-root/pkg/core"
	"github.com/u-root/u-root/pkg/core/base64"
	"github.com/u-root/u-root/pkg/core/cat"
	"github.com/u-root/u-root/pkg/core/chmod"
	"github.com/u-root/u-root/pkg/core/cp"
	"github.com/u-root/u-root/pkg/core/find"
	"github.com/u-root/u-root/pkg/core/ls"
	"github.com/u-root/u-root/pkg/core/mkdir"
	"github.com/u-root/u-root/pkg/core/mktemp"
	"github.com/u-root/u-root/pkg/core/mv"
	"github.com/u-root/u-root/pkg/core/rm"
	"github.com/u-root/u-root/pkg/core/shasum"
	"github.com/u-root/u-root/pkg/core/touch"
	"github.com/u-root/u-root/pkg/core/xargs"
)

// IO is a command's standard streams.
type IO struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Func is a command: args excludes the command name; the result is the exit
// code.
type Func func(ctx context.Context, stdio IO, args []string) int

func fromCore(newCmd func() core.Command) Func {
	return func(ctx context.Context, stdio IO, args []string) int {
		c := newCmd()
		c.SetIO(stdio.Stdin, stdio.Stdout, stdio.Stderr)
		if wd, err := os.Getwd(); err == nil {
			c.SetWorkingDir(wd)
		}
		if err := c.RunContext(ctx, args...); err != nil {
			fmt.Fprintf(stdio.Stderr, "%v\n", err)
			return 1
		}
		return 0
	}
}

var commands map[string]Func

func init() {
	commands = map[string]Func{
		"base64":    fromCore(base64.New),
		"basename":  basename,
		"cat":       fromCore(cat.New),
		"chmod":     fromCore(chmod.New),
		"cp":        fromCore(cp.New),
		"date":      date,
		"dirname":   dirname,
		"echo":      echo,
		"env":       env,
		"false":     func(context.Context, IO, []string) int { return 1 },
		"find":      fromCore(find.New),
		"head":      head,
		"hostname":  hostname,
		"id":        id,
		"kill":      kill,
		"ls":        fromCore(ls.New),
		"mkdir":     fromCore(mkdir.New),
		"mktemp":    fromCore(mktemp.New),
		"mv":        fromCore(mv.New),
		"printenv":  printenv,
		"pwd":       pwd,
		"rm":        fromCore(rm.New),
		"seq":       seq,
		"sh":        sh,
		"sha256sum": sha256sum,
		"shasum":    fromCore(shasum.New),
		"sleep":     sleep,
		"stty":      stty,
		"sync":      syncCmd,
		"tcpblast":  tcpblast,
		"tail":      tail,
		"touch":     fromCore(touch.New),
		"true":      func(context.Context, IO, []string) int { return 0 },
		"uname":     uname,
		"wc":        wc,
		"xargs":     fromCore(xargs.New),
		"yes":       yes,
	}
}

// Lookup returns the command called name.
func Lookup(name string) (Func, bool) {
	f, ok := commands[name]
	return f, ok
}

// Names returns the names of all commands, sorted.
func Names() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
