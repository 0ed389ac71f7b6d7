package netcfg

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// ErrHostsTooLarge is wrapped by the *StepError Apply returns when the
// existing hosts file is larger than MaxHostsFile.
var ErrHostsTooLarge = errors.New("hosts file larger than 1 MiB")

// hostsMarker is the comment line above the entries Apply adds to the
// hosts file; a later merge drops it and writes it again.
const hostsMarker = "# added by gosandbox"

// RenderResolvConf returns the resolv.conf text for nameservers dns and
// search domains search (both assumed valid, see Config.Validate).
func RenderResolvConf(dns []netip.Addr, search []string) []byte {
	var b bytes.Buffer
	b.WriteString("# written by gosandbox at boot\n")
	for _, a := range dns {
		b.WriteString("nameserver ")
		b.WriteString(a.String())
		b.WriteByte('\n')
	}
	if len(search) > 0 {
		b.WriteString("search ")
		b.WriteString(strings.Join(search, " "))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// MergeHosts merges entries (assumed valid, see Config.Validate) into the
// hosts file text old and returns the new text:
//   - a line of old that names none of the entries is kept byte for byte
//     (comments, blank lines and lines it cannot parse included);
//   - a line that names one of them loses those names, and goes if it has
//     none left;
//   - "127.0.0.1 localhost" and "::1 localhost" are put first when old
//     maps localhost to neither;
//   - the entries follow at the end, one per line, under a marker comment
//     (which a later merge removes and writes again).
//
// Names compare without regard to ASCII case, as resolvers compare them.
// Merging the result again with the same entries gives the same text.
func MergeHosts(old []byte, entries []HostEntry) []byte {
	ours := make(map[string]bool, len(entries))
	for _, e := range entries {
		ours[lower(e.Name)] = true
	}
	var kept bytes.Buffer
	var have4, have6 bool
	for len(old) > 0 {
		var line []byte
		if i := bytes.IndexByte(old, '\n'); i >= 0 {
			line, old = old[:i], old[i+1:]
		} else {
			line, old = old, nil
		}
		if string(bytes.TrimRight(line, "\r")) == hostsMarker {
			continue
		}
		body, comment := line, []byte(nil)
		if i := bytes.IndexByte(line, '#'); i >= 0 {
			body, comment = line[:i], line[i:]
		}
		fields := hostsFields(body)
		if len(fields) < 2 {
			kept.Write(line)
			kept.WriteByte('\n')
			continue
		}
		addr, addrErr := netip.ParseAddr(string(fields[0]))
		names := fields[1:]
		var left [][]byte
		for _, n := range names {
			if !ours[lower(string(n))] {
				left = append(left, n)
			}
		}
		if len(left) == 0 {
			continue
		}
		if addrErr == nil {
			for _, n := range left {
				if lower(string(n)) == "localhost" {
					have4 = have4 || addr == netip.AddrFrom4([4]byte{127, 0, 0, 1})
					have6 = have6 || addr == netip.IPv6Loopback()
				}
			}
		}
		if len(left) == len(names) {
			kept.Write(line)
			kept.WriteByte('\n')
			continue
		}
		kept.Write(fields[0])
		kept.WriteByte('\t')
		kept.Write(bytes.Join(left, []byte(" ")))
		if comment != nil {
			kept.WriteByte(' ')
			kept.Write(bytes.TrimRight(comment, "\r"))
		}
		kept.WriteByte('\n')
	}
	var out bytes.Buffer
	if !have4 {
		out.WriteString("127.0.0.1\tlocalhost\n")
	}
	if !have6 {
		out.WriteString("::1\tlocalhost\n")
	}
	out.Write(kept.Bytes())
	if len(entries) > 0 {
		out.WriteString(hostsMarker + "\n")
		for _, e := range entries {
			out.WriteString(e.Addr.String())
			out.WriteByte('\t')
			out.WriteString(e.Name)
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}

// hostsFields splits a hosts line as the C library does: on the bytes C's
// isspace accepts.
func hostsFields(b []byte) [][]byte {
	return bytes.FieldsFunc(b, func(r rune) bool {
		switch r {
		case ' ', '\t', '\n', '\v', '\f', '\r':
			return true
		}
		return false
	})
}

// readHosts reads the existing hosts file through any symlink; a missing
// file (or a dangling link) reads as empty.
func readHosts(path string) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxHostsFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > MaxHostsFile {
		return nil, ErrHostsTooLarge
	}
	return b, nil
}

// writeFileAtomic replaces path with a regular file holding data (mode
// 0644): it writes a temporary file in the same directory and renames it
// over path. The rename replaces a symlink at path itself, never its
// target. The directory is created if missing (an image without /etc).
// There is no fsync: the files are written at every boot, so a crash
// loses nothing that the next boot does not write again.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("%s is a directory", path)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".gosandbox-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
