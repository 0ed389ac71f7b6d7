package kernel

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/mod/module"
	"golang.org/x/mod/sumdb/dirhash"

	"github.com/gosandbox/sandbox/vmm/linuxboot"
)

const (
	// maxZipSize caps a downloaded module zip and the sum of the sizes of
	// its files (the go command allows 500 MiB).
	maxZipSize = 500 << 20
)

// fetchModule finds the module in the Go module cache or downloads it,
// verifies it against the pinned sum, and installs a copy of its kernel in
// the cache. It returns the copy's path and hex SHA-256.
func (o *options) fetchModule(ctx context.Context) (path, sum string, src Source, err error) {
	escPath, err := module.EscapePath(Module)
	if err != nil {
		return "", "", "", err
	}
	escVer, err := module.EscapeVersion(o.version)
	if err != nil {
		return "", "", "", fmt.Errorf("kernel: bad module version %q: %w", o.version, err)
	}
	var tried []string
	if mc := *o.modCache; mc != "" {
		dir := filepath.Join(mc, filepath.FromSlash(escPath)+"@"+escVer)
		if st, err := os.Stat(filepath.Join(dir, KernelFile)); err == nil && st.Mode().IsRegular() {
			o.log.Info("kernel: verifying module in the Go module cache", "dir", dir)
			path, sum, err := o.verifyDir(dir)
			return path, sum, SourceModCache, err
		}
		tried = append(tried, dir)
		zipPath := filepath.Join(mc, "cache", "download", filepath.FromSlash(escPath), "@v", escVer+".zip")
		if st, err := os.Stat(zipPath); err == nil && st.Mode().IsRegular() {
			o.log.Info("kernel: verifying module zip in the Go module cache", "zip", zipPath)
			path, sum, err := o.verifyZip(zipPath, zipPath, SourceModCacheZip)
			return path, sum, SourceModCacheZip, err
		}
		tried = append(tried, zipPath)
	} else {
		tried = append(tried, "no Go module cache")
	}

	var errs []error
	for _, p := range parseGOPROXY(*o.goproxy) {
		switch p.url {
		case "off":
			errs = append(errs, errors.New("GOPROXY=off disallows downloads"))
			return "", "", "", &NotFoundError{Module: Module + "@" + o.version, Tried: tried, Errs: errs}
		case "direct":
			tried = append(tried, "GOPROXY entry direct")
			errs = append(errs, errors.New(`GOPROXY entry "direct" means fetching from version control with the go command, which this library does not do`))
			continue
		case "noproxy":
			continue
		}
		u := p.url + "/" + escPath + "/@v/" + escVer + ".zip"
		tried = append(tried, u)
		o.log.Info("kernel: downloading module", "url", u)
		tmp, err := o.download(ctx, u)
		if err == nil {
			path, sum, err := o.verifyZip(tmp, u, SourceProxy)
			os.Remove(tmp)
			return path, sum, SourceProxy, err
		}
		if ctx.Err() != nil {
			return "", "", "", ctx.Err()
		}
		errs = append(errs, err)
		var de *DownloadError
		notFound := errors.As(err, &de) && (de.Status == http.StatusNotFound || de.Status == http.StatusGone)
		if !notFound && !p.anyErr {
			return "", "", "", err
		}
	}
	return "", "", "", &NotFoundError{Module: Module + "@" + o.version, Tried: tried, Errs: errs}
}

// download fetches a module zip into a temporary file and returns its name.
func (o *options) download(ctx context.Context, u string) (string, error) {
	var body io.ReadCloser
	if rest, ok := strings.CutPrefix(u, "file://"); ok {
		f, err := os.Open(filepath.FromSlash(rest))
		if errors.Is(err, os.ErrNotExist) {
			return "", &DownloadError{URL: u, Status: http.StatusNotFound}
		} else if err != nil {
			return "", &DownloadError{URL: u, Err: err}
		}
		body = f
	} else {
		if _, err := url.Parse(u); err != nil {
			return "", &DownloadError{URL: u, Err: err}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return "", &DownloadError{URL: u, Err: err}
		}
		resp, err := o.client.Do(req)
		if err != nil {
			return "", &DownloadError{URL: u, Err: err}
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return "", &DownloadError{URL: u, Status: resp.StatusCode}
		}
		body = resp.Body
	}
	defer body.Close()
	f, err := o.tempFile()
	if err != nil {
		return "", err
	}
	n, err := io.Copy(f, io.LimitReader(body, maxZipSize+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && n > maxZipSize {
		err = fmt.Errorf("module zip is larger than %d bytes", maxZipSize)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", &DownloadError{URL: u, Err: err}
	}
	return f.Name(), nil
}

// copyKernel copies r (at most linuxboot.MaxVmlinuxSize bytes) into a
// temporary file and returns its name and hex SHA-256.
func (o *options) copyKernel(r io.Reader) (string, string, error) {
	f, err := o.tempFile()
	if err != nil {
		return "", "", err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, linuxboot.MaxVmlinuxSize+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && n > linuxboot.MaxVmlinuxSize {
		err = linuxboot.ErrTooLarge
	}
	if err != nil {
		os.Remove(f.Name())
		return "", "", fmt.Errorf("kernel: copy %s: %w", KernelFile, err)
	}
	return f.Name(), hex.EncodeToString(h.Sum(nil)), nil
}

// verify hashes the module's files with the go.sum algorithm, reading the
// kernel from its private copy tmp, so that what is installed is exactly
// what was verified. On success tmp is installed in the cache.
func (o *options) verify(files []string, open func(string) (io.ReadCloser, error), tmp, where string, src Source) (string, error) {
	prefix := Module + "@" + o.version + "/"
	kernelName := prefix + KernelFile
	got, err := dirhash.Hash1(files, func(name string) (io.ReadCloser, error) {
		if name == kernelName {
			return os.Open(tmp)
		}
		return open(name)
	})
	if err != nil {
		if src == SourceModCache {
			return "", fmt.Errorf("kernel: hashing %s: %w", where, err)
		}
		// A zip whose entries cannot be read back is corrupt.
		got = "(unreadable: " + err.Error() + ")"
	}
	if got != o.sum {
		return "", &ChecksumError{Module: Module + "@" + o.version, Path: where, Source: src, Want: o.sum, Got: got}
	}
	base, err := o.moduleBase()
	if err != nil {
		return "", err
	}
	dst := filepath.Join(base, KernelFile)
	if err := install(tmp, dst); err != nil {
		return "", err
	}
	return dst, nil
}

// verifyDir verifies an extracted module directory.
func (o *options) verifyDir(dir string) (string, string, error) {
	prefix := Module + "@" + o.version
	files, err := dirhash.DirFiles(dir, prefix)
	if err != nil {
		return "", "", fmt.Errorf("kernel: listing %s: %w", dir, err)
	}
	f, err := os.Open(filepath.Join(dir, KernelFile))
	if err != nil {
		return "", "", fmt.Errorf("kernel: %w", err)
	}
	tmp, sum, err := o.copyKernel(f)
	f.Close()
	if err != nil {
		return "", "", err
	}
	path, err := o.verify(files, func(name string) (io.ReadCloser, error) {
		return os.Open(filepath.Join(dir, filepath.FromSlash(strings.TrimPrefix(name, prefix+"/"))))
	}, tmp, dir, SourceModCache)
	if err != nil {
		os.Remove(tmp)
		return "", "", err
	}
	return path, sum, nil
}

// verifyZip verifies a module zip; where names it in errors.
func (o *options) verifyZip(zipPath, where string, src Source) (string, string, error) {
	z, err := zip.OpenReader(zipPath)
	if err != nil {
		if src == SourceProxy {
			return "", "", &ChecksumError{Module: Module + "@" + o.version, Path: where, Source: src, Want: o.sum, Got: "(not a zip file: " + err.Error() + ")"}
		}
		return "", "", fmt.Errorf("kernel: %s: %w (remove it and try again)", where, err)
	}
	defer z.Close()
	kernelName := Module + "@" + o.version + "/" + KernelFile
	var (
		files  []string
		total  uint64
		kernel *zip.File
	)
	byName := make(map[string]*zip.File, len(z.File))
	for _, f := range z.File {
		files = append(files, f.Name)
		byName[f.Name] = f
		total += f.UncompressedSize64
		if f.Name == kernelName {
			kernel = f
		}
	}
	if total > maxZipSize || kernel == nil {
		// Either way its hash cannot match a module with a kernel.
		return "", "", &ChecksumError{Module: Module + "@" + o.version, Path: where, Source: src, Want: o.sum, Got: fmt.Sprintf("(%d files, %d bytes, kernel present: %v)", len(files), total, kernel != nil)}
	}
	r, err := kernel.Open()
	if err != nil {
		return "", "", fmt.Errorf("kernel: %s: %w", where, err)
	}
	tmp, sum, err := o.copyKernel(r)
	r.Close()
	if err != nil {
		return "", "", err
	}
	path, err := o.verify(files, func(name string) (io.ReadCloser, error) {
		f := byName[name]
		if f == nil {
			return nil, fmt.Errorf("%s not in zip", name)
		}
		return f.Open()
	}, tmp, where, src)
	if err != nil {
		os.Remove(tmp)
		return "", "", err
	}
	return path, sum, nil
}
