package userland

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func runCmd(t *testing.T, stdin string, name string, args ...string) (int, string, string) {
	t.Helper()
	f, ok := Lookup(name)
	if !ok {
		t.Fatalf("Lookup(%q) failed", name)
	}
	var out, errb bytes.Buffer
	code := f(context.Background(), IO{Stdin: strings.NewReader(stdin), Stdout: &out, Stderr: &errb}, args)
	return code, out.String(), errb.String()
}

func TestCommands(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("a b\nc\n"), 0o644)
	tests := []struct {
		stdin string
		args  []string
		code  int
		out   string
	}{
		{"", []string{"true"}, 0, ""},
		{"", []string{"false"}, 1, ""},
		{"", []string{"echo", "-n", "a", "b"}, 0, "a b"},
		{"xyz", []string{"cat"}, 0, "xyz"},
		{"", []string{"cat", filepath.Join(dir, "f")}, 0, "a b\nc\n"},
		{"", []string{"seq", "3"}, 0, "1\n2\n3\n"},
		{"", []string{"seq", "2", "2", "6"}, 0, "2\n4\n6\n"},
		{"", []string{"seq", "-s", ",", "3"}, 0, "1,2,3\n"},
		{"", []string{"seq", "5", "1"}, 0, ""},
		{"1\n2\n3\n4\n", []string{"head", "-n", "2"}, 0, "1\n2\n"},
		{"1\n2\n3\n4\n", []string{"head", "-2"}, 0, "1\n2\n"},
		{"abcdef", []string{"head", "-c", "3"}, 0, "abc"},
		{"1\n2\n3\n4\n", []string{"tail", "-n", "2"}, 0, "3\n4\n"},
		{"a b\nc\n", []string{"wc"}, 0, "2 3 6\n"},
		{"a b\nc\n", []string{"wc", "-l"}, 0, "2\n"},
		{"abc", []string{"sha256sum"}, 0, fmt.Sprintf("%x  -\n", sha256.Sum256([]byte("abc")))},
		{"", []string{"env", "-i", "A=1", "B=2"}, 0, "A=1\nB=2\n"},
		{"", []string{"uname"}, 0, "Linux\n"},
		{"", []string{"basename", "/a/b.txt", ".txt"}, 0, "b\n"},
		{"", []string{"dirname", "/a/b"}, 0, "/a\n"},
		{"", []string{"sh", "-c", "echo $1-$2", "name", "x", "y"}, 0, "x-y\n"},
		{"", []string{"sh", "-c", "exit 4"}, 4, ""},
		{"echo from-stdin\n", []string{"sh"}, 0, "from-stdin\n"},
		{"", []string{"sleep", "0.01"}, 0, ""},
		{"", []string{"sleep", "bogus"}, 1, ""},
		{"", []string{"kill"}, 1, ""},
		{"", []string{"stty", "size"}, 1, ""}, // stdin is not a terminal
	}
	for _, tt := range tests {
		code, out, errs := runCmd(t, tt.stdin, tt.args[0], tt.args[1:]...)
		if code != tt.code || out != tt.out {
			t.Errorf("%q <<< %q = %d, %q (stderr %q); want %d, %q", tt.args, tt.stdin, code, out, errs, tt.code, tt.out)
		}
	}
}

func TestFileCommands(t *testing.T) {
	dir := t.TempDir()
	d := filepath.Join(dir, "x", "y")
	if code, _, errs := runCmd(t, "", "mkdir", "-p", d); code != 0 {
		t.Fatalf("mkdir -p: %d %s", code, errs)
	}
	os.WriteFile(filepath.Join(d, "file"), nil, 0o644)
	if code, out, _ := runCmd(t, "", "ls", d); code != 0 || !strings.Contains(out, "file") {
		t.Errorf("ls = %d, %q", code, out)
	}
	if code, _, errs := runCmd(t, "", "rm", "-r", filepath.Join(dir, "x")); code != 0 {
		t.Fatalf("rm -r: %d %s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); !os.IsNotExist(err) {
		t.Errorf("rm -r left %v", err)
	}
}

func TestKill(t *testing.T) {
	cmd := exec.Command("sleep", "100")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary on this machine")
	}
	if code, _, errs := runCmd(t, "", "kill", "-s", "KILL", fmt.Sprint(cmd.Process.Pid)); code != 0 {
		t.Errorf("kill: %d %s", code, errs)
	}
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("sleep ended with %v, want SIGKILL", err)
	}
}

func TestParseSizeAndDuration(t *testing.T) {
	for in, want := range map[string]int64{"64M": 64 << 20, "1K": 1024, "2kB": 2000, "10": 10, "3MiB": 3 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := parseSize("-1"); err == nil {
		t.Errorf("parseSize(-1) succeeded")
	}
	if d, err := parseDuration("1.5m"); err != nil || d != 90*time.Second {
		t.Errorf("parseDuration(1.5m) = %v, %v", d, err)
	}
}
