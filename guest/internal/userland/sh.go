package userland

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"mvdan.cc/sh/v3/interp"
	"mvdan.cc/sh/v3/syntax"
)

// sh [-eux...] [-c COMMAND [NAME [ARG]...] | FILE [ARG]...]
//
// Without -c or FILE it reads a script from stdin, interactively (with a
// prompt) when stdin is a terminal.
func sh(ctx context.Context, stdio IO, args []string) int {
	var opts []string
	cmdMode := false
	for len(args) > 0 && len(args[0]) > 1 && (args[0][0] == '-' || args[0][0] == '+') {
		a := args[0]
		args = args[1:]
		if a == "--" {
			break
		}
		if a == "-c" {
			cmdMode = true
			continue
		}
		if strings.HasPrefix(a, "-") && strings.Contains(a, "c") {
			cmdMode = true
			a = strings.ReplaceAll(a, "c", "")
			if a == "-" {
				continue
			}
		}
		opts = append(opts, a)
	}
	var src io.Reader
	name := "sh"
	var params []string
	interactive := false
	switch {
	case cmdMode:
		if len(args) == 0 {
			return fail(stdio, "sh", "-c requires an argument")
		}
		src = strings.NewReader(args[0])
		if len(args) > 2 {
			params = args[2:]
		}
	case len(args) > 0:
		f, err := os.Open(args[0])
		if err != nil {
			fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
			return 127
		}
		defer f.Close()
		src, name, params = f, args[0], args[1:]
	default:
		src = stdio.Stdin
		if f, ok := stdio.Stdin.(*os.File); ok {
			if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
				interactive = true
			}
		} else {
			// The interpreter copies a non-file stdin through a pipe
			// on its own goroutine, which would race the parser for
			// the script: read the script first.
			b, err := io.ReadAll(stdio.Stdin)
			if err != nil {
				fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
				return 2
			}
			src = bytes.NewReader(b)
		}
	}
	runner, err := interp.New(
		interp.StdIO(stdio.Stdin, stdio.Stdout, stdio.Stderr),
		interp.Params(append(opts, append([]string{"--"}, params...)...)...),
		interp.Interactive(interactive),
		interp.CallHandler(func(ctx context.Context, args []string) ([]string, error) {
			// The interpreter knows kill as a builtin it does not
			// implement: run this binary's kill instead.
			if args[0] == "kill" {
				if exe, err := os.Executable(); err == nil {
					return append([]string{exe, "kill"}, args[1:]...), nil
				}
			}
			return args, nil
		}),
		interp.ExecHandlers(func(next interp.ExecHandlerFunc) interp.ExecHandlerFunc {
			return interp.DefaultExecHandler(2 * time.Second)
		}),
	)
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
		return 2
	}
	parser := syntax.NewParser()
	status := func(err error) int {
		if err == nil {
			return 0
		}
		if code, ok := interp.IsExitStatus(err); ok {
			return int(code)
		}
		fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
		return 1
	}
	if interactive {
		prompt := "$ "
		if os.Geteuid() == 0 {
			prompt = "# "
		}
		io.WriteString(stdio.Stdout, prompt)
		last := 0
		err := parser.Interactive(src, func(stmts []*syntax.Stmt) bool {
			if parser.Incomplete() {
				io.WriteString(stdio.Stdout, "> ")
				return true
			}
			for _, st := range stmts {
				last = status(runner.Run(ctx, st))
				if runner.Exited() {
					return false
				}
			}
			io.WriteString(stdio.Stdout, prompt)
			return true
		})
		if err != nil {
			fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
			return 2
		}
		return last
	}
	prog, err := parser.Parse(src, name)
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "sh: %v\n", err)
		return 2
	}
	return status(runner.Run(ctx, prog))
}
