// Command image boots a sandbox from an OCI image. No public registry is
// needed: it builds a small image from this host's /bin/busybox (Debian:
// apt-get install busybox-static), loads it into a private image cache as
// a Docker archive would be loaded, and boots it. With -ref it pulls that
// image instead, showing download progress.
//
//	go run ./examples/image
//	go run ./examples/image -ref python:3.12-slim -- python3 --version
//
// Like examples/hello it runs itself inside the emulated KVM host where
// this host's KVM cannot boot Linux.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/gosandbox/sandbox"
	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/internal/examplehost"
)

func main() {
	ref := flag.String("ref", "", "pull this image instead of building one from /bin/busybox")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		args = []string{"sh", "-c", "cat /etc/motd; id; ls /; echo written > /tmp/x && cat /tmp/x"}
	}
	if err := run(*ref, args); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(ref string, args []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "gosandbox-image-example-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	st, err := image.Open(image.WithRoot(filepath.Join(dir, "cache")))
	if err != nil {
		return err
	}
	defer st.Close()

	var opt sandbox.Option
	if ref != "" {
		opt = sandbox.Image(ref, image.WithProgress(func(p image.Progress) {
			fmt.Printf("  %s %d/%d bytes\n", p.Layer, p.Done, p.Total)
		}))
	} else {
		imgs, err := st.Load(ctx, bytes.NewReader(busyboxArchive()))
		if err != nil {
			return err
		}
		fmt.Printf("loaded %s: %d layers, cached as %v\n", imgs[0].Digest, len(imgs[0].Layers), imgs[0].LayerPaths())
		opt = sandbox.FromImage(imgs[0])
	}
	sb, err := examplehost.New(ctx, opt, sandbox.ImageStore(st), sandbox.Memory(256<<20), sandbox.NoNetwork())
	if err != nil {
		return err
	}
	defer sb.Close()
	fmt.Printf("%s\n%s\n", sb, sb.Phases())
	res, err := sb.Run(ctx, args[0], args[1:]...)
	if err != nil {
		return err
	}
	fmt.Printf("$ %q (exit %d)\n%s%s", args, res.ExitCode, res.Stdout, res.Stderr)
	return nil
}

// busyboxArchive is a Docker archive (docker save) of a two-layer image:
// busybox with a few applet links, and a layer adding /etc/motd.
func busyboxArchive() []byte {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		fmt.Fprintln(os.Stderr, "image: /bin/busybox is needed (apt-get install busybox-static):", err)
		os.Exit(1)
	}
	base := []entry{{"bin/", tar.TypeDir, "", "", 0o755}, {"bin/busybox", tar.TypeReg, string(bb), "", 0o755},
		{"etc/", tar.TypeDir, "", "", 0o755}, {"etc/passwd", tar.TypeReg, "root:x:0:0:root:/root:/bin/sh\n", "", 0o644},
		{"tmp/", tar.TypeDir, "", "", 0o1777}}
	for _, app := range []string{"sh", "ls", "cat", "echo", "id"} {
		base = append(base, entry{"bin/" + app, tar.TypeSymlink, "", "busybox", 0o777})
	}
	top := []entry{{"etc/", tar.TypeDir, "", "", 0o755}, {"etc/motd", tar.TypeReg, "hello from an OCI image layer\n", "", 0o644}}
	img := empty.Image
	for _, l := range [][]entry{base, top} {
		data := layerTar(l)
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err == nil {
			img, err = mutate.AppendLayers(img, layer)
		}
		if err != nil {
			panic(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		panic(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = v1.Config{Env: []string{"PATH=/bin"}, Cmd: []string{"sh"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		panic(err)
	}
	tag, err := name.NewTag("example.gosandbox.internal/busybox:latest")
	if err != nil {
		panic(err)
	}
	var buf bytes.Buffer
	if err := tarball.Write(tag, img, &buf); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

type entry struct {
	name       string
	typ        byte
	body, link string
	mode       int64
}

func layerTar(ents []entry) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0)}
		if err := tw.WriteHeader(h); err != nil {
			panic(err)
		}
		io.WriteString(tw, e.body)
	}
	tw.Close()
	return b.Bytes()
}
