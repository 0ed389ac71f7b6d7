package lazy9p_test

import (
	"archive/tar"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hugelgupf/p9/linux"
	"github.com/hugelgupf/p9/p9"

	"github.com/gosandbox/sandbox/image/lazy9p"
	"github.com/gosandbox/sandbox/internal/testimage"
	"github.com/gosandbox/sandbox/internal/testimage/testlazy"
)

// TestServe9P mounts the lazy image through a real 9P client and server
// (hugelgupf/p9) over an in-memory connection.
func TestServe9P(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 4096) // 64 KiB: several chunks
	type e = testimage.Entry
	li := testlazy.Open(t,
		testimage.Tar(t, e{Name: "bin/", Type: tar.TypeDir, Mode: 0o755}, e{Name: "bin/tool", Body: big, Mode: 0o755},
			e{Name: "bin/sh", Type: tar.TypeSymlink, Link: "tool", Mode: 0o777}, e{Name: "etc/gone", Body: "x", Mode: 0o644}),
		testimage.Tar(t, e{Name: "etc/", Type: tar.TypeDir, Mode: 0o755}, e{Name: "etc/.wh.gone", Mode: 0o644}, e{Name: "etc/motd", Body: "hi\n", Mode: 0o644}),
	)
	srvConn, cliConn := net.Pipe()
	server := p9.NewServer(lazy9p.New(li))
	done := make(chan error, 1)
	go func() { done <- server.Handle(srvConn, srvConn) }()
	client, err := p9.NewClient(cliConn)
	if err != nil {
		t.Fatal(err)
	}
	root, err := client.Attach("/")
	if err != nil {
		t.Fatal(err)
	}

	_, tool, err := root.Walk([]string{"bin", "tool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := tool.Open(p9.ReadOnly); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(big)+10)
	n, err := tool.ReadAt(got, 0)
	if err != nil && err != io.EOF || string(got[:n]) != big {
		t.Fatalf("read %d bytes (%v), want the %d-byte file", n, err, len(big))
	}
	_, mask, attr, err := tool.GetAttr(p9.AttrMaskAll)
	if err != nil || !mask.Size || attr.Size != uint64(len(big)) || attr.Mode.Permissions() != 0o755 || !attr.Mode.IsRegular() {
		t.Fatalf("GetAttr = %+v, %v", attr, err)
	}
	_, tool2, err := root.Walk([]string{"bin", "tool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := tool2.Open(p9.WriteOnly); !errors.Is(err, linux.EROFS) {
		t.Errorf("open for write: %v, want EROFS", err)
	}

	_, sh, err := root.Walk([]string{"bin", "sh"})
	if err != nil {
		t.Fatal(err)
	}
	if tg, err := sh.Readlink(); err != nil || tg != "tool" {
		t.Errorf("Readlink = %q, %v", tg, err)
	}
	_, etc, err := root.Walk([]string{"etc"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := etc.Open(p9.ReadOnly); err != nil {
		t.Fatal(err)
	}
	dents, err := etc.Readdir(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range dents {
		names = append(names, d.Name)
	}
	if strings.Join(names, ",") != "motd" {
		t.Errorf("etc lists %v, want [motd] (gone is whited out)", names)
	}
	if _, _, err := root.Walk([]string{"etc", "gone"}); !errors.Is(err, linux.ENOENT) {
		t.Errorf("walk to whited-out file: %v, want ENOENT", err)
	}
	// The p9 server refuses ".." names itself; lazy9p would clean them
	// to stay inside the root anyway.
	if qids, _, err := root.Walk([]string{"..", "..", "bin"}); err == nil && (len(qids) != 3 || qids[2].Type != p9.TypeDir) {
		t.Errorf("walk above the root escaped: %v", qids)
	}

	_ = client.Close()
	_ = cliConn.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("9P server did not stop after the client closed")
	}
}
