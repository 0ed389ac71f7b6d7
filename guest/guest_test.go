package guest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/guest/internal/buildinfo"
	"github.com/u-root/u-root/pkg/cpio"
)

// TestEmbeddedArtifactMatchesSource fails when the embedded guest binary
// is stale: its source fingerprint differs from the tree's, or (with the
// toolchain that built it) a fresh reproducible build gives other bytes.
// Fix it with `go generate ./guest/...`.
func TestEmbeddedArtifactMatchesSource(t *testing.T) {
	m, err := ReadManifest()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := Binary()
	if err != nil {
		t.Fatalf("Binary() = %v", err)
	}
	src, inputs, err := buildinfo.SourceHash(".")
	if err != nil {
		t.Fatalf("SourceHash = %v", err)
	}
	if src != m.SourceSHA256 {
		t.Errorf("the guest sources changed since the embedded artifact was built; run `go generate ./guest/...` and commit guest/artifact")
		t.Logf("inputs now, not in the manifest:")
		old := map[string]bool{}
		for _, in := range m.Sources {
			old[in] = true
		}
		for _, in := range inputs {
			if !old[in] {
				t.Logf("  + %s", in)
			}
		}
	}
	goVersion, err := buildinfo.GoVersion(".")
	if err != nil {
		t.Fatal(err)
	}
	if goVersion != m.GoVersion {
		t.Logf("toolchain %s differs from the artifact's %s: skipping the byte-for-byte rebuild (the source fingerprint was checked)", goVersion, m.GoVersion)
		return
	}
	out := filepath.Join(t.TempDir(), "init")
	if err := buildinfo.Build(".", out); err != nil {
		t.Fatal(err)
	}
	rebuilt, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rebuilt, bin) {
		sum := sha256.Sum256(rebuilt)
		t.Errorf("rebuilt guest binary (%d bytes, sha256 %s) differs from the embedded one (%d bytes, %s); run `go generate ./guest/...`",
			len(rebuilt), hex.EncodeToString(sum[:]), len(bin), m.BinarySHA256)
	}
}

func readArchive(t *testing.T, b []byte) map[string]cpio.Record {
	t.Helper()
	rr := cpio.Newc.Reader(bytes.NewReader(b))
	recs := map[string]cpio.Record{}
	if err := cpio.ForEachRecord(rr, func(r cpio.Record) error {
		recs[r.Name] = r
		return nil
	}); err != nil {
		t.Fatalf("reading the initramfs: %v", err)
	}
	return recs
}

func TestInitramfs(t *testing.T) {
	a, err := Initramfs()
	if err != nil {
		t.Fatalf("Initramfs() = %v", err)
	}
	b, _ := Initramfs()
	if !bytes.Equal(a, b) {
		t.Errorf("Initramfs() differs between calls")
	}
	t.Logf("initramfs: %d bytes", len(a))
	recs := readArchive(t, a)
	mode := func(name string) uint64 { return recs[name].Mode }
	checks := []struct {
		name string
		typ  uint64
	}{
		{"init", cpio.S_IFREG}, {"bin/sh", cpio.S_IFLNK}, {"bin/cat", cpio.S_IFLNK}, {"usr/bin/env", cpio.S_IFLNK},
		{"dev/console", cpio.S_IFCHR}, {"dev/port", cpio.S_IFCHR}, {"dev/null", cpio.S_IFCHR},
		{"proc", cpio.S_IFDIR}, {"sys", cpio.S_IFDIR}, {"dev", cpio.S_IFDIR}, {"tmp", cpio.S_IFDIR},
		{"etc/passwd", cpio.S_IFREG}, {"etc/group", cpio.S_IFREG}, {"etc/hosts", cpio.S_IFREG},
	}
	for _, c := range checks {
		if _, ok := recs[c.name]; !ok || mode(c.name)&cpio.S_IFMT != c.typ {
			t.Errorf("initramfs entry %q: present %v, mode %#o; want type %#o", c.name, ok, mode(c.name), c.typ)
		}
	}
	if mode("init")&0o111 == 0 {
		t.Errorf("/init is not executable: %#o", mode("init"))
	}
	if r := recs["dev/console"]; r.Rmajor != 5 || r.Rminor != 1 {
		t.Errorf("/dev/console is %d:%d, want 5:1", r.Rmajor, r.Rminor)
	}
	for _, cmd := range []string{"sh", "true", "false", "echo", "cat", "ls", "sleep", "env", "seq", "head", "yes", "wc", "sha256sum", "kill", "stty", "uname", "mkdir", "rm"} {
		if _, ok := recs["bin/"+cmd]; !ok {
			t.Errorf("initramfs has no /bin/%s", cmd)
		}
	}

	// The /init from the archive runs its userland on this machine.
	initBin, err := io.ReadAll(io.NewSectionReader(recs["init"], 0, int64(recs["init"].FileSize)))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "init")
	if err := os.WriteFile(path, initBin, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(path, "sh", "-c", "echo hi; seq 3 | wc -l").CombinedOutput()
	if err != nil || string(out) != "hi\n3\n" {
		t.Errorf("init sh -c ... = %q, %v; want %q", out, err, "hi\n3\n")
	}
}

func TestKernelCmdline(t *testing.T) {
	if got := KernelCmdline(""); !strings.Contains(got, "gosandbox.agent="+PortName) || !strings.Contains(got, "rdinit=/init") {
		t.Errorf("KernelCmdline(\"\") = %q", got)
	}
}

func BenchmarkInitramfs(b *testing.B) {
	for b.Loop() {
		if _, err := Initramfs(); err != nil {
			b.Fatal(err)
		}
	}
}
