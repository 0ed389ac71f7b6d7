package image

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// ArchiveFormat selects what Save writes.
type ArchiveFormat int

const (
	// FormatBoth writes one tar that is both a Docker archive
	// (manifest.json) and an OCI image layout (oci-layout, index.json),
	// like docker save since Docker 25. It is the default.
	FormatBoth ArchiveFormat = iota
	// FormatDocker writes a Docker archive (docker save / docker load).
	FormatDocker
	// FormatOCI writes an OCI image layout as a tar.
	FormatOCI
)

const (
	maxArchiveEntries = 1 << 16
	annotationRefName = "org.opencontainers.image.ref.name"
	annotationImgName = "io.containerd.image.name"
)

// tarIndex maps the regular files of an archive to their byte ranges, so
// blobs can be read without extracting anything to disk.
type tarIndex struct {
	f     *os.File
	files map[string]section
}

type section struct{ off, size int64 }

type posReader struct {
	r   io.Reader
	pos int64
}

func (p *posReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.pos += int64(n)
	return n, err
}

func indexTar(ctx context.Context, f *os.File) (*tarIndex, error) {
	pr := &posReader{r: io.NewSectionReader(f, 0, 1<<62)}
	tr := tar.NewReader(pr)
	ix := &tarIndex{f: f, files: map[string]section{}}
	for n := 0; ; n++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if n > maxArchiveEntries {
			return nil, fmt.Errorf("%w: archive has more than %d entries", ErrInvalidManifest, maxArchiveEntries)
		}
		h, err := tr.Next()
		if err == io.EOF {
			return ix, nil
		}
		if err != nil {
			return nil, fmt.Errorf("archive: %w", tarErr(err))
		}
		p, err := cleanEntryPath(h.Name)
		if err != nil {
			return nil, &LayerError{Path: h.Name, Err: err}
		}
		if h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeRegA {
			continue
		}
		if _, dup := ix.files[p]; dup {
			return nil, &LayerError{Path: h.Name, Err: fmt.Errorf("%w: archive lists it twice", ErrDuplicateEntry)}
		}
		ix.files[p] = section{off: pr.pos, size: h.Size}
	}
}

func (ix *tarIndex) open(name string) (*io.SectionReader, error) {
	p, err := cleanEntryPath(name)
	if err != nil {
		return nil, &LayerError{Path: name, Err: err}
	}
	s, ok := ix.files[p]
	if !ok {
		return nil, fmt.Errorf("%w: archive has no file %q", ErrInvalidManifest, name)
	}
	return io.NewSectionReader(ix.f, s.off, s.size), nil
}

func (ix *tarIndex) read(name string) ([]byte, error) {
	r, err := ix.open(name)
	if err != nil {
		return nil, err
	}
	if r.Size() > maxMetaBlob {
		return nil, fmt.Errorf("%w: %q is %d bytes (max %d)", ErrInvalidManifest, name, r.Size(), maxMetaBlob)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %v", ErrTruncated, name, err)
	}
	if int64(len(b)) != r.Size() {
		return nil, fmt.Errorf("%w: %q", ErrTruncated, name)
	}
	return b, nil
}

func blobName(d string) (string, error) {
	h, err := hexOf(d)
	if err != nil {
		return "", err
	}
	return "blobs/sha256/" + h, nil
}

func hashReader(r io.Reader) (string, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return "", n, err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), n, nil
}

// Load imports every image of a Docker archive (docker save) or an OCI
// image layout tar read from r. Named images are recorded under their names
// (RepoTags, or the OCI ref.name annotations); unnamed ones under their
// manifest digest. The archive is untrusted: paths are checked, blobs are
// verified against their digests and layers against the config's diff_ids,
// and nothing is extracted outside the cache.
func (s *Store) Load(ctx context.Context, r io.Reader) ([]*Image, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	unlock, err := s.gcLock(ctx, false)
	if err != nil {
		return nil, err
	}
	defer unlock()
	f, err := s.tempFile("archive-*.tar")
	if err != nil {
		return nil, err
	}
	defer discard(f)
	if _, err := io.Copy(f, r); err != nil {
		return nil, fmt.Errorf("image: load: spool archive: %w", err)
	}
	ix, err := indexTar(ctx, f)
	if err != nil {
		return nil, err
	}
	type loaded struct {
		names  []string
		img    *Image
		rawM   []byte
		rawCfg []byte
	}
	var todo []loaded
	paths := map[string]string{} // layer digest -> archive path (Docker archives)
	if _, ok := ix.files["manifest.json"]; ok {
		b, err := ix.read("manifest.json")
		if err != nil {
			return nil, err
		}
		var entries []struct {
			Config   string
			RepoTags []string
			Layers   []string
		}
		if err := json.Unmarshal(b, &entries); err != nil {
			return nil, fmt.Errorf("%w: manifest.json: %v", ErrInvalidManifest, err)
		}
		for _, e := range entries {
			rawCfg, err := ix.read(e.Config)
			if err != nil {
				return nil, err
			}
			cd, err := v1.NewHash(digestOf(rawCfg))
			if err != nil {
				return nil, err
			}
			m := v1.Manifest{SchemaVersion: 2, MediaType: types.DockerManifestSchema2,
				Config: v1.Descriptor{MediaType: types.DockerConfigJSON, Size: int64(len(rawCfg)), Digest: cd}}
			for _, lp := range e.Layers {
				lr, err := ix.open(lp)
				if err != nil {
					return nil, err
				}
				d, n, err := hashReader(lr)
				if err != nil {
					return nil, fmt.Errorf("%w: %q: %v", ErrTruncated, lp, err)
				}
				mt := types.DockerUncompressedLayer
				var magic [4]byte
				if _, err := lr.ReadAt(magic[:], 0); err == nil {
					switch {
					case magic[0] == 0x1f && magic[1] == 0x8b:
						mt = types.DockerLayer
					case bytes.Equal(magic[:], []byte{0x28, 0xb5, 0x2f, 0xfd}):
						mt = types.OCILayerZStd
					}
				}
				ld, err := v1.NewHash(d)
				if err != nil {
					return nil, err
				}
				paths[d] = lp
				m.Layers = append(m.Layers, v1.Descriptor{MediaType: mt, Size: n, Digest: ld})
			}
			rawM, err := json.Marshal(m)
			if err != nil {
				return nil, err
			}
			todo = append(todo, loaded{names: e.RepoTags, rawM: rawM, rawCfg: rawCfg})
		}
	} else if _, ok := ix.files["index.json"]; ok {
		b, err := ix.read("index.json")
		if err != nil {
			return nil, err
		}
		var walk func(b []byte, depth int, names []string) error
		walk = func(b []byte, depth int, names []string) error {
			if depth > 4 {
				return fmt.Errorf("%w: index nesting deeper than 4", ErrInvalidManifest)
			}
			im, err := v1.ParseIndexManifest(bytes.NewReader(b))
			if err != nil {
				return fmt.Errorf("%w: index: %v", ErrInvalidManifest, err)
			}
			for _, d := range im.Manifests {
				if d.Platform != nil && (d.Platform.OS != "linux" || d.Platform.Architecture != "amd64") {
					continue
				}
				ns := names
				for _, k := range []string{annotationImgName, annotationRefName} {
					if v := d.Annotations[k]; v != "" {
						ns = append(append([]string{}, names...), v)
						break
					}
				}
				bn, err := blobName(d.Digest.String())
				if err != nil {
					return err
				}
				raw, err := ix.read(bn)
				if err != nil {
					return err
				}
				if got := digestOf(raw); got != d.Digest.String() {
					return &DigestError{What: "manifest", Want: d.Digest.String(), Got: got}
				}
				if d.MediaType.IsIndex() {
					if err := walk(raw, depth+1, ns); err != nil {
						return err
					}
					continue
				}
				m, err := v1.ParseManifest(bytes.NewReader(raw))
				if err != nil {
					return fmt.Errorf("%w: manifest %s: %v", ErrInvalidManifest, d.Digest, err)
				}
				cn, err := blobName(m.Config.Digest.String())
				if err != nil {
					return err
				}
				rawCfg, err := ix.read(cn)
				if err != nil {
					return err
				}
				todo = append(todo, loaded{names: ns, rawM: raw, rawCfg: rawCfg})
			}
			return nil
		}
		if err := walk(b, 0, nil); err != nil {
			return nil, err
		}
	} else {
		return nil, fmt.Errorf("%w: neither manifest.json (Docker archive) nor index.json (OCI layout) found", ErrInvalidManifest)
	}
	if len(todo) == 0 {
		return nil, fmt.Errorf("%w: the archive holds no linux/amd64 image", ErrNotFound)
	}

	var out []*Image
	for _, t := range todo {
		m, err := v1.ParseManifest(bytes.NewReader(t.rawM))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalidManifest, err)
		}
		if got := digestOf(t.rawCfg); got != m.Config.Digest.String() {
			return nil, &DigestError{What: "config", Want: m.Config.Digest.String(), Got: got}
		}
		cfg, err := v1.ParseConfigFile(bytes.NewReader(t.rawCfg))
		if err != nil {
			return nil, fmt.Errorf("%w: config: %v", ErrInvalidManifest, err)
		}
		md := digestOf(t.rawM)
		img, err := assemble("", md, m, cfg)
		if err != nil {
			return nil, err
		}
		fetch := func(ctx context.Context, l *Layer) (io.ReadCloser, error) {
			name, ok := paths[l.Digest]
			if !ok {
				var err error
				if name, err = blobName(l.Digest); err != nil {
					return nil, err
				}
			}
			r, err := ix.open(name)
			if err != nil {
				return nil, err
			}
			return io.NopCloser(r), nil
		}
		if err := s.importLayers(ctx, "", img, nil, fetch); err != nil {
			return nil, err
		}
		if err := s.putBlob(m.Config.Digest.String(), t.rawCfg); err != nil {
			return nil, err
		}
		if err := s.putBlob(md, t.rawM); err != nil {
			return nil, err
		}
		keys := []string{md}
		for _, n := range t.names {
			k, err := normalizeRef(n, false)
			if err != nil {
				continue // a bare tag annotation ("latest") is not a reference
			}
			keys = append(keys, k)
		}
		if len(keys) > 1 {
			keys = keys[1:]
		}
		if err := s.updateIndex(ctx, func(ix *index) error {
			for _, k := range keys {
				ix.Refs[k] = indexEntry{Digest: md, Time: time.Now().UTC()}
			}
			return nil
		}); err != nil {
			return nil, err
		}
		img.Ref = keys[0]
		out = append(out, img)
	}
	return out, nil
}

// Save writes the named cached images (references or manifest digests) as
// one archive. Blobs are written exactly as cached, so manifest and layer
// digests are preserved: loading the archive into another Store (or with
// docker load) gives the same image IDs.
func (s *Store) Save(ctx context.Context, w io.Writer, format ArchiveFormat, refs ...string) error {
	if err := s.check(); err != nil {
		return err
	}
	if len(refs) == 0 {
		return errors.New("image: Save: no images named")
	}
	type entry struct {
		img  *Image
		name string
	}
	var imgs []entry
	for _, r := range refs {
		key, err := normalizeRef(r, false)
		if err != nil {
			return err
		}
		img, err := s.get(key)
		if err != nil {
			return err
		}
		name := ""
		if !strings.HasPrefix(key, "sha256:") && !strings.Contains(key, "@") {
			name = key
		}
		imgs = append(imgs, entry{img, name})
	}
	tw := tar.NewWriter(w)
	written := map[string]bool{}
	epoch := time.Unix(0, 0)
	addFile := func(name string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: size, Typeflag: tar.TypeReg, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		n, err := io.Copy(tw, r)
		if err == nil && n != size {
			err = fmt.Errorf("%w: %s changed size while saving", ErrTruncated, name)
		}
		return err
	}
	addBlob := func(d string) error {
		if written[d] {
			return nil
		}
		p, err := s.blobPath(d)
		if err != nil {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("image: Save: blob %s missing from the cache: %w", d, err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		bn, _ := blobName(d)
		written[d] = true
		return addFile(bn, fi.Size(), f)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "blobs/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch}); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: "blobs/sha256/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch}); err != nil {
		return err
	}
	type dockerEntry struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	var dm []dockerEntry
	var oi v1.IndexManifest
	oi.SchemaVersion = 2
	oi.MediaType = types.OCIImageIndex
	for _, e := range imgs {
		if err := ctx.Err(); err != nil {
			return err
		}
		for _, d := range []string{e.img.Digest, e.img.Manifest.Config.Digest.String()} {
			if err := addBlob(d); err != nil {
				return err
			}
		}
		de := dockerEntry{Config: "blobs/sha256/" + e.img.Manifest.Config.Digest.Hex}
		if e.name != "" {
			de.RepoTags = []string{e.name}
		}
		for _, l := range e.img.Layers {
			if err := addBlob(l.Digest); err != nil {
				return err
			}
			bn, _ := blobName(l.Digest)
			de.Layers = append(de.Layers, bn)
		}
		dm = append(dm, de)
		mp, _ := s.blobPath(e.img.Digest)
		fi, err := os.Stat(mp)
		if err != nil {
			return err
		}
		mt := e.img.Manifest.MediaType
		if mt == "" {
			mt = types.OCIManifestSchema1
		}
		md, err := v1.NewHash(e.img.Digest)
		if err != nil {
			return err
		}
		desc := v1.Descriptor{MediaType: mt, Size: fi.Size(), Digest: md,
			Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}
		if e.name != "" {
			desc.Annotations = map[string]string{annotationImgName: e.name}
			if i := strings.LastIndex(e.name, ":"); i > strings.LastIndex(e.name, "/") {
				desc.Annotations[annotationRefName] = e.name[i+1:]
			}
		}
		oi.Manifests = append(oi.Manifests, desc)
	}
	if format == FormatBoth || format == FormatDocker {
		b, err := json.Marshal(dm)
		if err != nil {
			return err
		}
		if err := addFile("manifest.json", int64(len(b)), bytes.NewReader(b)); err != nil {
			return err
		}
	}
	if format == FormatBoth || format == FormatOCI {
		layout := []byte(`{"imageLayoutVersion":"1.0.0"}`)
		if err := addFile("oci-layout", int64(len(layout)), bytes.NewReader(layout)); err != nil {
			return err
		}
		b, err := json.Marshal(oi)
		if err != nil {
			return err
		}
		if err := addFile("index.json", int64(len(b)), bytes.NewReader(b)); err != nil {
			return err
		}
	}
	return tw.Close()
}
