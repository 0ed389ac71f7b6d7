// Package guest holds what runs inside a sandbox VM and the archive that
// carries it there.
//
// The guest binary (guest/cmd/init: PID 1 init, agent and the default
// userland in one static Go program) is built from source by
// `go generate ./guest/...` and embedded here compressed, with a manifest of
// its source fingerprint; TestEmbeddedArtifactMatchesSource fails when the
// embedded binary no longer matches the source tree. Initramfs wraps it in
// a cpio archive the kernel unpacks as its root filesystem.
//
// Subpackages: agentproto (the wire protocol), agent (its guest side),
// agentclient (its host side).
//
// # Booting it
//
// The VMM loads Initramfs() as the initrd and passes a command line such as
//
//	console=hvc0 rdinit=/init gosandbox.agent=gosandbox.agent quiet
//
// and a virtio-console device whose port 0 is the console and which has a
// port named "gosandbox.agent" (PortName) for the agent; the host side of
// that port must be marked open (VIRTIO_CONSOLE_PORT_OPEN) so the guest's
// reads block instead of returning end of file. The init writes 1
// (BootMarkerInitStarted) and then 2 (BootMarkerAgentReady) to I/O port
// 0x440 (BootMarkerPort) so the VMM can time the boot phases. See
// guest/cmd/init for all the kernel parameters it reads.
package guest

//go:generate go run ./internal/mkartifact -out artifact

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"

	"github.com/gosandbox/sandbox/guest/internal/buildinfo"
	"github.com/gosandbox/sandbox/guest/internal/userland"
	"github.com/klauspost/compress/zstd"
	"github.com/u-root/u-root/pkg/cpio"
)

// PortName is the default name of the agent's virtio-console port.
const PortName = "gosandbox.agent"

// Boot markers: the guest init writes one byte to I/O port BootMarkerPort
// at each phase.
const (
	BootMarkerPort        = 0x440
	BootMarkerInitStarted = 1 // first thing /init does
	BootMarkerAgentReady  = 2 // the agent port is open and the agent starts serving
	BootMarkerPoweroff    = 3 // the guest powers off (then resets: there is no ACPI)
)

// KernelCmdline returns the kernel command line parameters the guest needs
// for the agent on port (PortName if empty).
func KernelCmdline(port string) string {
	if port == "" {
		port = PortName
	}
	return "console=hvc0 rdinit=/init gosandbox.agent=" + port
}

//go:embed artifact/init.zst artifact/manifest.json
var artifact embed.FS

// Manifest describes the embedded guest binary.
type Manifest = buildinfo.Manifest

// ReadManifest returns the manifest of the embedded guest binary.
func ReadManifest() (Manifest, error) {
	var m Manifest
	b, err := artifact.ReadFile("artifact/manifest.json")
	if err != nil {
		return m, fmt.Errorf("guest: embedded manifest: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("guest: embedded manifest: %w", err)
	}
	return m, nil
}

// Binary returns the embedded guest binary (static linux/amd64), checked
// against the manifest's SHA-256.
func Binary() ([]byte, error) {
	m, err := ReadManifest()
	if err != nil {
		return nil, err
	}
	z, err := artifact.ReadFile("artifact/" + m.Artifact)
	if err != nil {
		return nil, fmt.Errorf("guest: embedded artifact: %w", err)
	}
	if m.BinarySize <= 0 || m.BinarySize > 64<<20 {
		return nil, fmt.Errorf("guest: embedded manifest has a bad binary size %d", m.BinarySize)
	}
	zr, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(64<<20))
	if err != nil {
		return nil, fmt.Errorf("guest: embedded artifact: %w", err)
	}
	defer zr.Close()
	b, err := zr.DecodeAll(z, make([]byte, 0, m.BinarySize))
	if err != nil {
		return nil, fmt.Errorf("guest: embedded artifact: %w", err)
	}
	sum := sha256.Sum256(b)
	if hex.EncodeToString(sum[:]) != m.BinarySHA256 {
		return nil, fmt.Errorf("guest: embedded artifact does not match its manifest (run `go generate ./guest/...`)")
	}
	return b, nil
}

// Files of the default root filesystem besides /init and the command links.
var (
	etcPasswd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	etcGroup  = "root:x:0:\ntty:x:5:\nnobody:x:65534:\n"
	etcHosts  = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
)

// Initramfs returns the default guest root filesystem as an uncompressed
// cpio (newc) archive: /init, a link per userland command in /bin (sh, cat,
// ls, ...; also /usr/bin/env), the mount points /proc, /sys, /dev, /tmp,
// /run, the device nodes the init needs before devtmpfs is mounted
// (/dev/console, /dev/null, /dev/port), and /etc with passwd, group and
// hosts. The archive is the same bytes on every call.
func Initramfs() ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(5 << 20)
	if err := WriteInitramfs(&buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteInitramfs writes the archive Initramfs returns to w.
func WriteInitramfs(w io.Writer) error {
	bin, err := Binary()
	if err != nil {
		return err
	}
	recs := []cpio.Record{}
	for _, d := range []struct {
		name string
		mode uint64
	}{
		{"bin", 0o755}, {"dev", 0o755}, {"dev/pts", 0o755}, {"dev/shm", 0o1777}, {"etc", 0o755},
		{"mnt", 0o755}, {"proc", 0o555}, {"root", 0o700}, {"run", 0o755}, {"sbin", 0o755},
		{"sys", 0o555}, {"tmp", 0o1777}, {"usr", 0o755}, {"usr/bin", 0o755}, {"usr/sbin", 0o755},
		{"var", 0o755}, {"var/tmp", 0o1777},
	} {
		recs = append(recs, cpio.Directory(d.name, d.mode))
	}
	recs = append(recs,
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.CharDev("dev/null", 0o666, 1, 3),
		cpio.CharDev("dev/port", 0o640, 1, 4),
		cpio.StaticFile("etc/passwd", etcPasswd, 0o644),
		cpio.StaticFile("etc/group", etcGroup, 0o644),
		cpio.StaticFile("etc/hosts", etcHosts, 0o644),
		cpio.StaticRecord(bin, cpio.Info{Name: "init", Mode: cpio.S_IFREG | 0o755}),
		cpio.Symlink("sbin/init", "/init"),
		cpio.Symlink("usr/bin/env", "/init"),
	)
	for _, name := range userland.Names() {
		recs = append(recs, cpio.Symlink("bin/"+name, "/init"))
	}
	cw := cpio.Newc.Writer(w)
	for i := range recs {
		recs[i].Ino = uint64(i + 1)
		recs[i].NLink = 1
	}
	if err := cpio.WriteRecords(cw, recs); err != nil {
		return fmt.Errorf("guest: writing the initramfs: %w", err)
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return fmt.Errorf("guest: writing the initramfs: %w", err)
	}
	return nil
}
