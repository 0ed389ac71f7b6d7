// Package buildinfo builds the guest binary reproducibly and fingerprints
// its source inputs. The artifact generator (guest/internal/mkartifact, run
// by `go generate ./guest/...`) and the test that checks the embedded
// artifact against the source tree share it, so both build and hash the
// same way.
package buildinfo

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Package is the import path of the guest binary.
const Package = "github.com/gosandbox/sandbox/guest/cmd/init"

// BuildEnv is the environment the guest binary is built with (on top of
// the caller's, for GOPATH, GOCACHE and the like).
var BuildEnv = []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOAMD64=v1", "GOFLAGS=-buildvcs=false -mod=readonly", "GOEXPERIMENT="}

// BuildFlags are the go build flags that make the binary reproducible.
var BuildFlags = []string{"-trimpath", "-ldflags=-s -w -buildid="}

// Manifest describes an embedded guest artifact.
type Manifest struct {
	// GoVersion is the toolchain that built the binary (`go env GOVERSION`).
	GoVersion string `json:"go_version"`
	// Env and Flags are how it was built.
	Env   []string `json:"env"`
	Flags []string `json:"flags"`
	// SourceSHA256 fingerprints every input of the build: the main
	// module's Go version, the content of each of the module's packages
	// the binary links, and the path and version of every other module.
	SourceSHA256 string `json:"source_sha256"`
	// Sources lists the inputs that SourceSHA256 covers.
	Sources []string `json:"sources"`
	// BinarySHA256 and BinarySize describe the uncompressed binary.
	BinarySHA256 string `json:"binary_sha256"`
	BinarySize   int64  `json:"binary_size"`
	// Artifact is the compressed file (zstd) next to the manifest.
	Artifact string `json:"artifact"`
}

func goCmd(dir string, args ...string) *exec.Cmd {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), BuildEnv...)
	return cmd
}

// GoVersion returns the toolchain version that `go` in PATH runs.
func GoVersion(dir string) (string, error) {
	out, err := goCmd(dir, "env", "GOVERSION").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Build builds the guest binary into out. dir is any directory inside the
// module.
func Build(dir, out string) error {
	args := append([]string{"build"}, BuildFlags...)
	args = append(args, "-o", out, Package)
	cmd := goCmd(dir, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s: %w: %s", Package, err, stderr.String())
	}
	return nil
}

type listPackage struct {
	ImportPath string
	Dir        string
	Standard   bool
	GoFiles    []string
	SFiles     []string
	EmbedFiles []string
	Module     *struct {
		Path    string
		Version string
		Main    bool
		Replace *struct {
			Path    string
			Version string
		}
	}
}

// SourceHash fingerprints the inputs of the guest build, as seen from dir
// (inside the module). It returns the hex SHA-256 and the list of inputs.
func SourceHash(dir string) (string, []string, error) {
	cmd := goCmd(dir, "list", "-deps", "-json", Package)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", nil, fmt.Errorf("go list: %w: %s", err, stderr.String())
	}
	modGo, err := goCmd(dir, "list", "-m", "-f", "{{.GoVersion}}").Output()
	if err != nil {
		return "", nil, fmt.Errorf("go list -m: %w", err)
	}
	inputs := []string{"go-directive " + strings.TrimSpace(string(modGo))}
	fileHashes := map[string]string{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p listPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			return "", nil, fmt.Errorf("go list output: %w", err)
		}
		switch {
		case p.Standard:
			// Covered by the toolchain version, which the manifest records.
		case p.Module != nil && p.Module.Main:
			files := append(append(append([]string{}, p.GoFiles...), p.SFiles...), p.EmbedFiles...)
			for _, f := range files {
				b, err := os.ReadFile(filepath.Join(p.Dir, f))
				if err != nil {
					return "", nil, err
				}
				sum := sha256.Sum256(b)
				name := p.ImportPath + "/" + f
				fileHashes[name] = hex.EncodeToString(sum[:])
			}
		case p.Module != nil:
			m := "module " + p.Module.Path + "@" + p.Module.Version
			if r := p.Module.Replace; r != nil {
				m += " => " + r.Path + "@" + r.Version
			}
			inputs = append(inputs, m)
		default:
			return "", nil, fmt.Errorf("package %s has no module", p.ImportPath)
		}
	}
	for name, sum := range fileHashes {
		inputs = append(inputs, "file "+name+" "+sum)
	}
	sort.Strings(inputs)
	inputs = dedup(inputs)
	h := sha256.New()
	for _, in := range inputs {
		io.WriteString(h, in+"\n")
	}
	return hex.EncodeToString(h.Sum(nil)), inputs, nil
}

func dedup(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}
