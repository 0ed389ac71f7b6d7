package cpio

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

func TestArchiveReadsBackWithGNUCpio(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, e := range []Entry{
		{Name: "dev", Mode: TypeDir | 0o755},
		{Name: "dev/console", Mode: TypeChar | 0o600, Major: 5, Minor: 1},
		{Name: "init", Mode: TypeRegular | 0o755, Data: []byte("#!/bin/sh\necho hi\n")},
		{Name: "sh", Mode: TypeSymlink | 0o777, Data: []byte("init")},
	} {
		if err := w.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Fatalf("archive length %d is not 4-aligned", buf.Len())
	}
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("GNU cpio not installed")
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-tv")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	for _, want := range []string{"dev/console", "init", "sh -> init", "5,"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cpio -tv output lacks %q:\n%s", want, out)
		}
	}
}

func TestRejectsBadNames(t *testing.T) {
	w := NewWriter(&bytes.Buffer{})
	for _, n := range []string{"", "/abs", "../x", "a/../b", "a/.."} {
		if err := w.Add(Entry{Name: n, Mode: TypeRegular}); !errors.Is(err, ErrBadName) {
			t.Errorf("Add(%q) = %v, want ErrBadName", n, err)
		}
	}
	if err := w.Add(Entry{Name: "x", Mode: TypeRegular}); err != nil {
		t.Fatal(err)
	}
	if err := w.Add(Entry{Name: "x", Mode: TypeRegular}); !errors.Is(err, ErrBadName) {
		t.Errorf("duplicate: %v", err)
	}
}
