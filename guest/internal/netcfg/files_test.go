package netcfg

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var testEntries = []HostEntry{
	{"host.gosandbox.internal", netip.MustParseAddr("100.96.0.1")},
	{"db.internal", netip.MustParseAddr("fd00::5")},
}

func TestMergeHosts(t *testing.T) {
	for _, tc := range []struct {
		name, old, want string
		entries         []HostEntry
	}{
		{"empty", "", "127.0.0.1\tlocalhost\n::1\tlocalhost\n", nil},
		{
			"debian", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\n",
			"127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\n" +
				hostsMarker + "\n100.96.0.1\thost.gosandbox.internal\nfd00::5\tdb.internal\n",
			testEntries,
		},
		{
			"replace and keep", "# comment\n\n10.0.0.1 HOST.gosandbox.internal other # tail\r\n10.0.0.2 db.internal\nnot-an-address x\n127.0.0.1 localhost",
			"::1\tlocalhost\n# comment\n\n10.0.0.1\tother # tail\nnot-an-address x\n127.0.0.1 localhost\n" +
				hostsMarker + "\n100.96.0.1\thost.gosandbox.internal\nfd00::5\tdb.internal\n",
			testEntries,
		},
		{
			"localhost only on other addresses", "127.0.1.1 localhost\n::2 localhost\n",
			"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1 localhost\n::2 localhost\n", nil,
		},
		{
			"localhost line that also named ours", "127.0.0.1 localhost db.internal\n::1 localhost\n",
			"127.0.0.1\tlocalhost\n::1 localhost\n" + hostsMarker + "\n100.96.0.1\thost.gosandbox.internal\nfd00::5\tdb.internal\n",
			testEntries,
		},
		{
			"old marker and entries", "127.0.0.1 localhost\n::1 localhost\n" + hostsMarker + "\n10.9.9.9\thost.gosandbox.internal\n",
			"127.0.0.1 localhost\n::1 localhost\n" + hostsMarker + "\n100.96.0.1\thost.gosandbox.internal\nfd00::5\tdb.internal\n",
			testEntries,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := MergeHosts([]byte(tc.old), tc.entries)
			if string(got) != tc.want {
				t.Errorf("MergeHosts =\n%q\nwant\n%q", got, tc.want)
			}
			if again := MergeHosts(got, tc.entries); !bytes.Equal(again, got) {
				t.Errorf("merging twice gives\n%q\nthen\n%q", got, again)
			}
		})
	}
}

// FuzzMergeHosts checks, for any existing hosts file, that the merge
// keeps the promises MergeHosts documents: each of our names resolves to
// our address and to nothing else, localhost resolves to both loopback
// addresses, and a second merge changes nothing.
func FuzzMergeHosts(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte("127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n"))
	f.Add([]byte("10.0.0.1 host.gosandbox.internal db.internal # x\r\n# " + "added by gosandbox\n"))
	f.Add([]byte("\x00\xff\n\n\t# \v 1.2.3.4 HOST.GOSANDBOX.INTERNAL"))
	f.Add([]byte("fe80::1%eth0 db.internal\n1.2.3.4\vdb.internal\f\n"))
	f.Fuzz(func(t *testing.T, old []byte) {
		out := MergeHosts(old, testEntries)
		if again := MergeHosts(out, testEntries); !bytes.Equal(again, out) {
			t.Fatalf("not idempotent:\n%q\n%q", out, again)
		}
		if len(out) > 0 && out[len(out)-1] != '\n' {
			t.Fatalf("output does not end in a newline: %q", out)
		}
		resolved := map[string][]string{}
		for line := range strings.Lines(string(out)) {
			if i := strings.IndexByte(line, '#'); i >= 0 {
				line = line[:i]
			}
			f := hostsFields([]byte(line))
			if len(f) < 2 {
				continue
			}
			for _, n := range f[1:] {
				resolved[lower(string(n))] = append(resolved[lower(string(n))], string(f[0]))
			}
		}
		for _, e := range testEntries {
			if got := resolved[lower(e.Name)]; len(got) != 1 || got[0] != e.Addr.String() {
				t.Fatalf("%s resolves to %q, want only %v, in\n%s", e.Name, got, e.Addr, out)
			}
		}
		var has4, has6 bool
		for _, a := range resolved["localhost"] {
			has4 = has4 || a == "127.0.0.1"
			has6 = has6 || a == "::1"
		}
		if !has4 || !has6 {
			t.Fatalf("localhost resolves to %q, want 127.0.0.1 and ::1, in\n%s", resolved["localhost"], out)
		}
		// Lines that named none of our entries survive byte for byte.
		for line := range strings.Lines(string(old)) {
			line = strings.TrimSuffix(line, "\n")
			body, _, _ := strings.Cut(line, "#")
			ours := false
			fields := hostsFields([]byte(body))
			for i, n := range fields {
				for _, e := range testEntries {
					if i == 0 {
						break // the address, not a name
					}
					ours = ours || lower(string(n)) == lower(e.Name)
				}
			}
			if !ours && strings.TrimRight(line, "\r") != hostsMarker && !bytes.Contains(out, []byte(line+"\n")) {
				t.Fatalf("line %q lost, in\n%s", line, out)
			}
		}
	})
}

func TestRenderResolvConf(t *testing.T) {
	got := RenderResolvConf([]netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}, []string{"a.internal", "b"})
	want := "# written by gosandbox at boot\nnameserver 10.0.0.1\nnameserver fd00::1\nsearch a.internal b\n"
	if string(got) != want {
		t.Errorf("RenderResolvConf = %q, want %q", got, want)
	}
	if got := RenderResolvConf(nil, []string{"a"}); string(got) != "# written by gosandbox at boot\nsearch a\n" {
		t.Errorf("search only: %q", got)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "etc", "resolv.conf")
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../target", link); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(link, []byte("new\n")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(link)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Fatalf("after the write: %v %v, want a regular file with mode 0644", fi, err)
	}
	if b, _ := os.ReadFile(link); string(b) != "new\n" {
		t.Errorf("content %q", b)
	}
	if b, _ := os.ReadFile(target); string(b) != "old" {
		t.Errorf("the link's target was changed to %q", b)
	}

	// A dangling link (systemd's stub file on an image without systemd
	// running) is replaced the same way, and reads as an empty hosts file.
	dangling := filepath.Join(dir, "etc", "hosts")
	if err := os.Symlink("/nonexistent/hosts", dangling); err != nil {
		t.Fatal(err)
	}
	if b, err := readHosts(dangling); err != nil || len(b) != 0 {
		t.Errorf("readHosts(dangling link) = %q, %v; want empty, nil", b, err)
	}
	if err := writeFileAtomic(dangling, []byte("x\n")); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(dangling); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("dangling link not replaced: %v %v", fi, err)
	}

	// A directory in the way is an error, and no temporary file is left.
	if err := os.Mkdir(filepath.Join(dir, "etc", "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(filepath.Join(dir, "etc", "d"), []byte("x")); err == nil {
		t.Error("writing over a directory succeeded")
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "etc"))
	for _, e := range entries {
		if strings.Contains(e.Name(), "gosandbox-") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

func TestReadHostsTooLarge(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(p, bytes.Repeat([]byte("#\n"), MaxHostsFile/2+1), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readHosts(p); !errors.Is(err, ErrHostsTooLarge) {
		t.Errorf("readHosts(%d bytes) = %v, want ErrHostsTooLarge", MaxHostsFile+2, err)
	}
}
