package userland

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func fail(stdio IO, name string, format string, args ...any) int {
	fmt.Fprintf(stdio.Stderr, name+": "+format+"\n", args...)
	return 1
}

func echo(_ context.Context, stdio IO, args []string) int {
	nl := true
	for len(args) > 0 && args[0] == "-n" {
		nl = false
		args = args[1:]
	}
	s := strings.Join(args, " ")
	if nl {
		s += "\n"
	}
	io.WriteString(stdio.Stdout, s)
	return 0
}

func basename(_ context.Context, stdio IO, args []string) int {
	if len(args) < 1 {
		return fail(stdio, "basename", "usage: basename NAME [SUFFIX]")
	}
	b := filepath.Base(args[0])
	if len(args) > 1 && b != args[1] {
		b = strings.TrimSuffix(b, args[1])
	}
	fmt.Fprintln(stdio.Stdout, b)
	return 0
}

func dirname(_ context.Context, stdio IO, args []string) int {
	if len(args) < 1 {
		return fail(stdio, "dirname", "usage: dirname NAME...")
	}
	for _, a := range args {
		fmt.Fprintln(stdio.Stdout, filepath.Dir(a))
	}
	return 0
}

func pwd(_ context.Context, stdio IO, _ []string) int {
	wd, err := os.Getwd()
	if err != nil {
		return fail(stdio, "pwd", "%v", err)
	}
	fmt.Fprintln(stdio.Stdout, wd)
	return 0
}

func date(_ context.Context, stdio IO, args []string) int {
	t := time.Now()
	if len(args) > 0 && args[0] == "-u" {
		t = t.UTC()
		args = args[1:]
	}
	if len(args) > 0 && args[0] == "+%s" {
		fmt.Fprintln(stdio.Stdout, t.Unix())
		return 0
	}
	fmt.Fprintln(stdio.Stdout, t.Format(time.UnixDate))
	return 0
}

func syncCmd(context.Context, IO, []string) int {
	unix.Sync()
	return 0
}

func hostname(_ context.Context, stdio IO, args []string) int {
	if len(args) == 1 {
		if err := unix.Sethostname([]byte(args[0])); err != nil {
			return fail(stdio, "hostname", "%v", err)
		}
		return 0
	}
	h, err := os.Hostname()
	if err != nil {
		return fail(stdio, "hostname", "%v", err)
	}
	fmt.Fprintln(stdio.Stdout, h)
	return 0
}

func id(_ context.Context, stdio IO, args []string) int {
	switch {
	case len(args) > 0 && args[0] == "-u":
		fmt.Fprintln(stdio.Stdout, os.Getuid())
	case len(args) > 0 && args[0] == "-g":
		fmt.Fprintln(stdio.Stdout, os.Getgid())
	default:
		fmt.Fprintf(stdio.Stdout, "uid=%d gid=%d\n", os.Getuid(), os.Getgid())
	}
	return 0
}

func printenv(_ context.Context, stdio IO, args []string) int {
	if len(args) == 0 {
		for _, e := range os.Environ() {
			fmt.Fprintln(stdio.Stdout, e)
		}
		return 0
	}
	code := 0
	for _, a := range args {
		v, ok := os.LookupEnv(a)
		if !ok {
			code = 1
			continue
		}
		fmt.Fprintln(stdio.Stdout, v)
	}
	return code
}

// env [-i] [-u NAME]... [NAME=value]... [COMMAND [ARG]...]
func env(_ context.Context, stdio IO, args []string) int {
	environ := os.Environ()
	for len(args) > 0 {
		switch {
		case args[0] == "-i" || args[0] == "-":
			environ = nil
			args = args[1:]
		case args[0] == "-u" && len(args) > 1:
			environ = unset(environ, args[1])
			args = args[2:]
		case args[0] == "--":
			args = args[1:]
			goto vars
		default:
			goto vars
		}
	}
vars:
	for len(args) > 0 && strings.Contains(args[0], "=") {
		k, _, _ := strings.Cut(args[0], "=")
		environ = append(unset(environ, k), args[0])
		args = args[1:]
	}
	if len(args) == 0 {
		for _, e := range environ {
			fmt.Fprintln(stdio.Stdout, e)
		}
		return 0
	}
	return execve(stdio, "env", args, environ)
}

func unset(environ []string, key string) []string {
	out := environ[:0:0]
	for _, e := range environ {
		if k, _, _ := strings.Cut(e, "="); k != key {
			out = append(out, e)
		}
	}
	return out
}

// execve replaces the process with args[0], found in PATH; 127 if missing,
// 126 if not executable (the shell's conventions).
func execve(stdio IO, name string, args, environ []string) int {
	path, err := exec.LookPath(args[0])
	if err != nil {
		fmt.Fprintf(stdio.Stderr, "%s: %s: %v\n", name, args[0], err)
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			return 127
		}
		return 126
	}
	err = syscall.Exec(path, args, environ)
	fmt.Fprintf(stdio.Stderr, "%s: %s: %v\n", name, args[0], err)
	return 126
}

func parseDuration(s string) (time.Duration, error) {
	mult := 1.0
	switch {
	case strings.HasSuffix(s, "s"):
		s = s[:len(s)-1]
	case strings.HasSuffix(s, "m"):
		s, mult = s[:len(s)-1], 60
	case strings.HasSuffix(s, "h"):
		s, mult = s[:len(s)-1], 3600
	case strings.HasSuffix(s, "d"):
		s, mult = s[:len(s)-1], 86400
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("invalid time interval %q", s)
	}
	d := f * mult * float64(time.Second)
	if d > float64(math.MaxInt64) {
		return math.MaxInt64, nil
	}
	return time.Duration(d), nil
}

func sleep(ctx context.Context, stdio IO, args []string) int {
	if len(args) == 0 {
		return fail(stdio, "sleep", "missing operand")
	}
	var total time.Duration
	for _, a := range args {
		d, err := parseDuration(a)
		if err != nil {
			return fail(stdio, "sleep", "%v", err)
		}
		total += d
		if total < 0 {
			total = math.MaxInt64
		}
	}
	t := time.NewTimer(total)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	return 0
}

func seq(_ context.Context, stdio IO, args []string) int {
	sep := "\n"
	for len(args) > 0 && len(args[0]) > 1 && args[0][0] == '-' && (args[0][1] < '0' || args[0][1] > '9') && args[0][1] != '.' {
		if args[0] == "-s" && len(args) > 1 {
			sep = args[1]
			args = args[2:]
			continue
		}
		return fail(stdio, "seq", "unknown option %s", args[0])
	}
	first, incr := "1", "1"
	var last string
	switch len(args) {
	case 1:
		last = args[0]
	case 2:
		first, last = args[0], args[1]
	case 3:
		first, incr, last = args[0], args[1], args[2]
	default:
		return fail(stdio, "seq", "usage: seq [-s SEP] [FIRST [INCREMENT]] LAST")
	}
	w := bufio.NewWriter(stdio.Stdout)
	defer w.Flush()
	fi, e1 := strconv.ParseInt(first, 10, 64)
	ii, e2 := strconv.ParseInt(incr, 10, 64)
	li, e3 := strconv.ParseInt(last, 10, 64)
	if e1 == nil && e2 == nil && e3 == nil {
		if ii == 0 {
			return fail(stdio, "seq", "zero increment")
		}
		for i, n := fi, 0; (ii > 0 && i <= li) || (ii < 0 && i >= li); i, n = i+ii, n+1 {
			if n > 0 {
				w.WriteString(sep)
			}
			w.WriteString(strconv.FormatInt(i, 10))
			if (ii > 0 && i > math.MaxInt64-ii) || (ii < 0 && i < math.MinInt64-ii) {
				break
			}
		}
		if (ii > 0 && fi <= li) || (ii < 0 && fi >= li) {
			w.WriteString("\n")
		}
		return 0
	}
	ff, e1 := strconv.ParseFloat(first, 64)
	fincr, e2 := strconv.ParseFloat(incr, 64)
	fl, e3 := strconv.ParseFloat(last, 64)
	if e1 != nil || e2 != nil || e3 != nil || fincr == 0 || math.IsNaN(ff+fincr+fl) {
		return fail(stdio, "seq", "invalid argument")
	}
	n := 0
	for i := 0; ; i++ {
		v := ff + float64(i)*fincr
		if (fincr > 0 && v > fl) || (fincr < 0 && v < fl) {
			break
		}
		if n > 0 {
			w.WriteString(sep)
		}
		w.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
		n++
	}
	if n > 0 {
		w.WriteString("\n")
	}
	return 0
}

// parseSize reads N with an optional GNU multiplier suffix: b (512), K/k/KiB
// (1024), KB/kB (1000), M/MiB, MB, G/GiB, GB.
func parseSize(s string) (int64, error) {
	mults := []struct {
		suf string
		m   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"kB", 1000}, {"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000},
		{"K", 1 << 10}, {"k", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"b", 512},
	}
	m := int64(1)
	for _, x := range mults {
		if strings.HasSuffix(s, x.suf) {
			s, m = strings.TrimSuffix(s, x.suf), x.m
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || (n > 0 && m > math.MaxInt64/n) {
		return 0, fmt.Errorf("invalid number %q", s)
	}
	return n * m, nil
}

func openArgs(stdio IO, files []string, fn func(name string, r io.Reader) error) int {
	if len(files) == 0 {
		files = []string{"-"}
	}
	code := 0
	for _, name := range files {
		var r io.Reader = stdio.Stdin
		if name != "-" {
			f, err := os.Open(name)
			if err != nil {
				fmt.Fprintf(stdio.Stderr, "%v\n", err)
				code = 1
				continue
			}
			defer f.Close()
			r = f
		}
		if err := fn(name, r); err != nil {
			fmt.Fprintf(stdio.Stderr, "%s: %v\n", name, err)
			code = 1
		}
	}
	return code
}

// head [-n N | -c N | -N] [FILE]...
func head(_ context.Context, stdio IO, args []string) int {
	lines, bytesMode := int64(10), false
	var count int64
	for len(args) > 0 && strings.HasPrefix(args[0], "-") && args[0] != "-" {
		a := args[0]
		var val string
		switch {
		case a == "-n" || a == "-c":
			if len(args) < 2 {
				return fail(stdio, "head", "option %s needs a value", a)
			}
			val = args[1]
			args = args[2:]
		case strings.HasPrefix(a, "-n") || strings.HasPrefix(a, "-c"):
			val = a[2:]
			args = args[1:]
		default:
			val = a[1:]
			a = "-n"
			args = args[1:]
		}
		n, err := parseSize(val)
		if err != nil {
			return fail(stdio, "head", "%v", err)
		}
		if a[:2] == "-c" {
			bytesMode, count = true, n
		} else {
			lines = n
		}
	}
	w := bufio.NewWriterSize(stdio.Stdout, 64<<10)
	defer w.Flush()
	return openArgs(stdio, args, func(_ string, r io.Reader) error {
		if bytesMode {
			_, err := io.CopyN(w, r, count)
			if err == io.EOF {
				err = nil
			}
			return err
		}
		br := bufio.NewReaderSize(r, 64<<10)
		for i := int64(0); i < lines; i++ {
			line, err := br.ReadSlice('\n')
			w.Write(line)
			if err == bufio.ErrBufferFull {
				i--
				continue
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// tail [-n N] [FILE]: the last N lines.
func tail(_ context.Context, stdio IO, args []string) int {
	n := 10
	if len(args) > 1 && args[0] == "-n" {
		v, err := strconv.Atoi(args[1])
		if err != nil || v < 0 {
			return fail(stdio, "tail", "invalid number %q", args[1])
		}
		n, args = v, args[2:]
	}
	return openArgs(stdio, args, func(_ string, r io.Reader) error {
		ring := make([][]byte, 0, n)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		for sc.Scan() {
			if n == 0 {
				continue
			}
			if len(ring) == n {
				copy(ring, ring[1:])
				ring = ring[:n-1]
			}
			ring = append(ring, bytes.Clone(sc.Bytes()))
		}
		for _, l := range ring {
			stdio.Stdout.Write(append(l, '\n'))
		}
		return sc.Err()
	})
}

func yes(_ context.Context, stdio IO, args []string) int {
	line := "y\n"
	if len(args) > 0 {
		line = strings.Join(args, " ") + "\n"
	}
	buf := make([]byte, 0, 64<<10)
	for len(buf)+len(line) <= cap(buf) {
		buf = append(buf, line...)
	}
	if len(buf) == 0 {
		buf = []byte(line)
	}
	for {
		if _, err := stdio.Stdout.Write(buf); err != nil {
			return 0 // the reader went away (head): that is how yes ends
		}
	}
}

func wc(_ context.Context, stdio IO, args []string) int {
	var showL, showW, showC bool
	for len(args) > 0 && strings.HasPrefix(args[0], "-") && args[0] != "-" {
		for _, c := range args[0][1:] {
			switch c {
			case 'l':
				showL = true
			case 'w':
				showW = true
			case 'c', 'm':
				showC = true
			default:
				return fail(stdio, "wc", "unknown option -%c", c)
			}
		}
		args = args[1:]
	}
	if !showL && !showW && !showC {
		showL, showW, showC = true, true, true
	}
	var tl, tw, tc int64
	print := func(l, w, c int64, name string) {
		var f []string
		if showL {
			f = append(f, strconv.FormatInt(l, 10))
		}
		if showW {
			f = append(f, strconv.FormatInt(w, 10))
		}
		if showC {
			f = append(f, strconv.FormatInt(c, 10))
		}
		if name != "-" {
			f = append(f, name)
		}
		fmt.Fprintln(stdio.Stdout, strings.Join(f, " "))
	}
	code := openArgs(stdio, args, func(name string, r io.Reader) error {
		var l, w, c int64
		inWord := false
		buf := make([]byte, 64<<10)
		for {
			n, err := r.Read(buf)
			c += int64(n)
			for _, b := range buf[:n] {
				if b == '\n' {
					l++
				}
				space := b == ' ' || b == '\n' || b == '\t' || b == '\r' || b == '\v' || b == '\f'
				if !space && !inWord {
					w++
				}
				inWord = !space
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
		}
		print(l, w, c, name)
		tl, tw, tc = tl+l, tw+w, tc+c
		return nil
	})
	if len(args) > 1 {
		print(tl, tw, tc, "total")
	}
	return code
}

func sha256sum(_ context.Context, stdio IO, args []string) int {
	return openArgs(stdio, args, func(name string, r io.Reader) error {
		h := sha256.New()
		if _, err := io.Copy(h, r); err != nil {
			return err
		}
		fmt.Fprintf(stdio.Stdout, "%x  %s\n", h.Sum(nil), name)
		return nil
	})
}

func uname(_ context.Context, stdio IO, args []string) int {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fail(stdio, "uname", "%v", err)
	}
	fields := map[byte]string{
		's': unix.ByteSliceToString(u.Sysname[:]),
		'n': unix.ByteSliceToString(u.Nodename[:]),
		'r': unix.ByteSliceToString(u.Release[:]),
		'v': unix.ByteSliceToString(u.Version[:]),
		'm': unix.ByteSliceToString(u.Machine[:]),
	}
	var want []byte
	for _, a := range args {
		if !strings.HasPrefix(a, "-") {
			return fail(stdio, "uname", "extra operand %q", a)
		}
		for _, c := range []byte(a[1:]) {
			if c == 'a' {
				want = append(want, 's', 'n', 'r', 'v', 'm')
				continue
			}
			if _, ok := fields[c]; !ok {
				return fail(stdio, "uname", "unknown option -%c", c)
			}
			want = append(want, c)
		}
	}
	if len(want) == 0 {
		want = []byte{'s'}
	}
	var out []string
	for _, c := range "snrvm" {
		for _, w := range want {
			if byte(c) == w {
				out = append(out, fields[w])
				break
			}
		}
	}
	fmt.Fprintln(stdio.Stdout, strings.Join(out, " "))
	return 0
}

var signals = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT, "KILL": syscall.SIGKILL,
	"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "PIPE": syscall.SIGPIPE, "ALRM": syscall.SIGALRM,
	"TERM": syscall.SIGTERM, "CHLD": syscall.SIGCHLD, "CONT": syscall.SIGCONT, "STOP": syscall.SIGSTOP,
	"TSTP": syscall.SIGTSTP, "WINCH": syscall.SIGWINCH,
}

func parseSignal(s string) (syscall.Signal, bool) {
	if n, err := strconv.Atoi(s); err == nil && n >= 0 && n <= 64 {
		return syscall.Signal(n), true
	}
	sig, ok := signals[strings.TrimPrefix(strings.ToUpper(s), "SIG")]
	return sig, ok
}

// kill [-s SIG | -SIG] PID...; kill -l
func kill(_ context.Context, stdio IO, args []string) int {
	sig := syscall.SIGTERM
	if len(args) > 0 && args[0] == "-l" {
		for name, s := range signals {
			fmt.Fprintf(stdio.Stdout, "%d %s\n", int(s), name)
		}
		return 0
	}
	if len(args) > 1 && args[0] == "-s" {
		s, ok := parseSignal(args[1])
		if !ok {
			return fail(stdio, "kill", "unknown signal %q", args[1])
		}
		sig, args = s, args[2:]
	} else if len(args) > 0 && strings.HasPrefix(args[0], "-") && args[0] != "--" && len(args[0]) > 1 {
		s, ok := parseSignal(args[0][1:])
		if !ok {
			return fail(stdio, "kill", "unknown signal %q", args[0])
		}
		sig, args = s, args[1:]
	}
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return fail(stdio, "kill", "usage: kill [-s SIGNAL | -SIGNAL] PID...")
	}
	code := 0
	for _, a := range args {
		pid, err := strconv.Atoi(a)
		if err != nil {
			code = fail(stdio, "kill", "invalid pid %q", a)
			continue
		}
		if err := syscall.Kill(pid, sig); err != nil {
			code = fail(stdio, "kill", "(%d): %v", pid, err)
		}
	}
	return code
}

// stty [size | raw | -raw | sane | echo | -echo | rows N | cols N]... on stdin.
func stty(_ context.Context, stdio IO, args []string) int {
	f, ok := stdio.Stdin.(*os.File)
	if !ok {
		return fail(stdio, "stty", "standard input is not a terminal")
	}
	fd := int(f.Fd())
	ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
	if err != nil {
		return fail(stdio, "stty", "standard input: %v", err)
	}
	tio, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return fail(stdio, "stty", "standard input: %v", err)
	}
	if len(args) == 0 {
		fmt.Fprintf(stdio.Stdout, "rows %d; columns %d; echo %v; icanon %v\n", ws.Row, ws.Col, tio.Lflag&unix.ECHO != 0, tio.Lflag&unix.ICANON != 0)
		return 0
	}
	setWS, setTIO := false, false
	for i := 0; i < len(args); i++ {
		switch a := args[i]; a {
		case "size":
			fmt.Fprintf(stdio.Stdout, "%d %d\n", ws.Row, ws.Col)
		case "rows", "cols", "columns":
			if i+1 >= len(args) {
				return fail(stdio, "stty", "%s needs a value", a)
			}
			n, err := strconv.ParseUint(args[i+1], 10, 16)
			if err != nil {
				return fail(stdio, "stty", "invalid %s %q", a, args[i+1])
			}
			if a == "rows" {
				ws.Row = uint16(n)
			} else {
				ws.Col = uint16(n)
			}
			i++
			setWS = true
		case "raw":
			tio.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
			tio.Oflag &^= unix.OPOST
			tio.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
			tio.Cc[unix.VMIN], tio.Cc[unix.VTIME] = 1, 0
			setTIO = true
		case "-raw", "cooked", "sane":
			tio.Iflag |= unix.BRKINT | unix.ICRNL | unix.IXON
			tio.Oflag |= unix.OPOST
			tio.Lflag |= unix.ECHO | unix.ICANON | unix.ISIG | unix.IEXTEN
			setTIO = true
		case "echo":
			tio.Lflag |= unix.ECHO
			setTIO = true
		case "-echo":
			tio.Lflag &^= unix.ECHO
			setTIO = true
		default:
			return fail(stdio, "stty", "unsupported setting %q", a)
		}
	}
	if setWS {
		if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, ws); err != nil {
			return fail(stdio, "stty", "%v", err)
		}
	}
	if setTIO {
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, tio); err != nil {
			return fail(stdio, "stty", "%v", err)
		}
	}
	return 0
}
