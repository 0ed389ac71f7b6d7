// Command mkartifact builds the guest binary from source and writes the
// artifact package guest embeds: artifact/init.zst (the binary, zstd) and
// artifact/manifest.json (toolchain, build flags, source fingerprint and
// binary hash). `go generate ./guest/...` runs it from the guest directory.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/gosandbox/sandbox/guest/internal/buildinfo"
	"github.com/klauspost/compress/zstd"
)

func main() {
	out := flag.String("out", "artifact", "output directory")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintf(os.Stderr, "mkartifact: %v\n", err)
		os.Exit(1)
	}
}

func run(out string) error {
	tmp, err := os.MkdirTemp("", "gosandbox-mkartifact-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "init")
	if err := buildinfo.Build(".", bin); err != nil {
		return err
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	srcHash, inputs, err := buildinfo.SourceHash(".")
	if err != nil {
		return err
	}
	goVersion, err := buildinfo.GoVersion(".")
	if err != nil {
		return err
	}
	var zbuf bytes.Buffer
	zw, err := zstd.NewWriter(&zbuf, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return err
	}
	if _, err := zw.Write(b); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	sum := sha256.Sum256(b)
	m := buildinfo.Manifest{
		GoVersion:    goVersion,
		Env:          buildinfo.BuildEnv,
		Flags:        buildinfo.BuildFlags,
		SourceSHA256: srcHash,
		Sources:      inputs,
		BinarySHA256: hex.EncodeToString(sum[:]),
		BinarySize:   int64(len(b)),
		Artifact:     "init.zst",
	}
	mj, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "init.zst"), zbuf.Bytes(), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "manifest.json"), append(mj, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("mkartifact: guest binary %d bytes, %d compressed, sha256 %s\n", len(b), zbuf.Len(), m.BinarySHA256)
	return nil
}
