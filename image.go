package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/gosandbox/sandbox/guest/agentproto"
	"github.com/gosandbox/sandbox/image"
	"github.com/gosandbox/sandbox/image/ext4"
	"github.com/gosandbox/sandbox/image/lazy9p"
	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/p9"
)

// Image boots the sandbox from an OCI image instead of the built-in
// userland: ref is pulled into the image cache (package image) unless it is
// there already, each layer is attached as a read-only block device, and the
// guest stacks them with overlayfs under a writable layer (a tmpfs, or a
// disk with DiskSize). The image's Env, WorkingDir and User become the
// sandbox's defaults; Env and WorkDir options apply on top.
//
// Pulling uses the Docker credential helpers and config for
// authentication; pass image.WithProgress, image.WithPolicy,
// image.WithCredentials or image.WithInsecure as pull options.
func Image(ref string, opts ...image.PullOption) Option {
	return func(c *config) error {
		if ref == "" {
			return &OptionError{"Image", "empty reference"}
		}
		if c.img != nil || c.imageRef != "" {
			return &OptionError{"Image", "an image was given already"}
		}
		c.imageRef, c.pullOpts = ref, opts
		return nil
	}
}

// FromImage boots the sandbox from an image already in a Store (from
// Store.Pull, Get or Load), as Image does.
func FromImage(img *image.Image) Option {
	return func(c *config) error {
		if img == nil || len(img.Layers) == 0 {
			return &OptionError{"FromImage", "nil image or an image without layers"}
		}
		if c.imageRef != "" {
			return &OptionError{"FromImage", "an image reference was given already"}
		}
		c.img = img
		return nil
	}
}

// LazyImage boots the sandbox from an eStargz image without downloading
// it first: only the layers' tables of contents are fetched before the
// guest boots, and files are fetched (by HTTP range requests, verified
// chunk by chunk) when the guest first reads them, after the files the
// image builder marked for prefetch. The merged tree reaches the guest
// over virtio-9p (package image/lazy9p) as the lower layer of its
// overlayfs. An image that is not eStargz fails with image.ErrNotLazy; use
// Image for it.
func LazyImage(ref string, opts ...image.PullOption) Option {
	return func(c *config) error {
		if ref == "" {
			return &OptionError{"LazyImage", "empty reference"}
		}
		if c.img != nil || c.imageRef != "" {
			return &OptionError{"LazyImage", "an image was given already"}
		}
		c.imageRef, c.pullOpts, c.lazy = ref, opts, true
		return nil
	}
}

// ImageStore sets the image cache Image pulls into; by default New opens
// the user's cache (image.Open()).
func ImageStore(s *image.Store) Option {
	return func(c *config) error {
		if s == nil {
			return &OptionError{"ImageStore", "nil store"}
		}
		c.store = s
		return nil
	}
}

// DiskSize puts an image's writable layer on a sparse ext4 disk of size
// bytes, kept in a temporary file on the host and removed by Close,
// instead of a tmpfs in guest memory. Only the blocks written use host
// disk space.
func DiskSize(bytes int64) Option {
	return func(c *config) error {
		if bytes < ext4.MinSize || bytes > ext4.MaxSize {
			return &OptionError{"DiskSize", fmt.Sprintf("%d bytes, want %d..%d", bytes, int64(ext4.MinSize), int64(ext4.MaxSize))}
		}
		c.diskSize = bytes
		return nil
	}
}

// TmpfsSize bounds an image's writable layer when it is a tmpfs (the
// default; see DiskSize for a disk instead) to bytes of guest memory. The
// default is the kernel's, half of the guest's memory.
func TmpfsSize(bytes uint64) Option {
	return func(c *config) error {
		if bytes < 1<<20 {
			return &OptionError{"TmpfsSize", fmt.Sprintf("%d bytes, want at least 1 MiB", bytes)}
		}
		c.tmpfsSize = bytes
		return nil
	}
}

// rootDisks holds the host side of an image root: the open layer files,
// the block devices over them and the upper disk.
type rootDisks struct {
	files   []*os.File
	devs    []virtio.Device
	lazy    *image.LazyImage
	stop    context.CancelFunc // ends the prefetch
	wg      sync.WaitGroup
	tmpDir  string
	root    *agentproto.RootConfig
	command image.Command
	image   *image.Image
}

// abort ends what may still be fetching for a lazy image (the prefetch and
// any range request in flight), so that the 9P device can be closed
// without waiting for the network. Close calls it before closing devices.
func (r *rootDisks) abort() error {
	if r.stop != nil {
		r.stop()
	}
	var err error
	if r.lazy != nil {
		err = r.lazy.Close()
		r.lazy = nil
	}
	r.wg.Wait()
	return err
}

func (r *rootDisks) close() error {
	errs := []error{r.abort()}
	for _, d := range r.devs {
		errs = append(errs, d.Close())
	}
	for _, f := range r.files {
		errs = append(errs, f.Close())
	}
	if r.tmpDir != "" {
		errs = append(errs, os.RemoveAll(r.tmpDir))
	}
	return errors.Join(errs...)
}

// resolveImage pulls or takes the configured image.
func resolveImage(ctx context.Context, cfg *config) (*image.Image, error) {
	if cfg.img != nil {
		return cfg.img, nil
	}
	st := cfg.store
	if st == nil {
		var err error
		if st, err = image.Open(image.WithLogger(cfg.logger)); err != nil {
			return nil, err
		}
		defer st.Close()
	}
	img, err := st.Pull(ctx, cfg.imageRef, cfg.pullOpts...)
	if err != nil {
		return nil, fmt.Errorf("sandbox: image %s: %w", cfg.imageRef, err)
	}
	return img, nil
}

// lazyTag is the virtio-9p mount tag of a lazily pulled image.
const lazyTag = "image"

// lazyRoot opens the configured eStargz image and makes the 9P device that
// serves it; prefetching starts in the background.
func lazyRoot(ctx context.Context, cfg *config) (_ *rootDisks, err error) {
	st := cfg.store
	if st == nil {
		if st, err = image.Open(image.WithLogger(cfg.logger)); err != nil {
			return nil, err
		}
		defer st.Close()
	}
	li, err := st.OpenLazy(ctx, cfg.imageRef, cfg.pullOpts...)
	if err != nil {
		return nil, fmt.Errorf("sandbox: lazy image %s: %w", cfg.imageRef, err)
	}
	r := &rootDisks{root: &agentproto.RootConfig{Shares: []string{lazyTag}}, lazy: li}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if err := r.setCommand(li.Image); err != nil {
		return nil, err
	}
	dev, err := p9.New(p9.Options{Tag: lazyTag, Attacher: lazy9p.New(li), MaxMessage: 1 << 20, Logger: cfg.logger})
	if err != nil {
		return nil, err
	}
	r.devs = append(r.devs, dev)
	if err := r.addUpper(cfg); err != nil {
		return nil, err
	}
	pctx, stop := context.WithCancel(context.Background())
	r.stop = stop
	r.wg.Go(func() {
		if err := li.Prefetch(pctx); err != nil && pctx.Err() == nil {
			cfg.logger.Debug("sandbox: lazy image prefetch failed; files are fetched on demand", "err", err)
		}
	})
	return r, nil
}

// setCommand takes the sandbox defaults from the image config. Only the
// environment, directory and user apply; the image's command is not run
// by itself (an entrypoint placeholder keeps images without one
// acceptable).
func (r *rootDisks) setCommand(img *image.Image) error {
	cmd, err := img.Command(image.Overrides{Entrypoint: []string{"sh"}})
	if err != nil {
		return fmt.Errorf("sandbox: image config: %w", err)
	}
	r.command, r.image = cmd, img
	return nil
}

// ErrNoImage: the sandbox was not booted from an image.
var ErrNoImage = errors.New("sandbox: not booted from an image")

// ImageCommand returns the command the sandbox's image runs by default
// (its Entrypoint and Cmd, with the image's Env, WorkingDir and User), as
// `docker run IMAGE ARGS...` would: args, if any, replace the image's Cmd.
// Pass the result to Exec, after setting its streams. It fails with
// ErrNoImage without an image, and when the image names no command.
func (sb *Sandbox) ImageCommand(args ...string) (Cmd, error) {
	if sb.disks == nil || sb.disks.image == nil {
		return Cmd{}, ErrNoImage
	}
	ic, err := sb.disks.image.Command(image.Overrides{Cmd: args})
	if err != nil {
		return Cmd{}, fmt.Errorf("sandbox: %w", err)
	}
	return Cmd{Args: ic.Args, Env: ic.Env, Dir: ic.Dir, User: ic.User}, nil
}

// imageDisks opens the layer images of img and makes the block devices;
// the caller attaches them and closes r when done.
func imageDisks(img *image.Image, cfg *config) (_ *rootDisks, err error) {
	r := &rootDisks{root: &agentproto.RootConfig{}}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if err := r.setCommand(img); err != nil {
		return nil, err
	}
	paths := img.LayerPaths()
	if len(paths) > agentproto.MaxLayers {
		return nil, fmt.Errorf("sandbox: image has %d layers, at most %d can be stacked", len(paths), agentproto.MaxLayers)
	}
	for i, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("sandbox: layer %d of the image: %w (the image cache may have been pruned; pull again)", i, err)
		}
		r.files = append(r.files, f)
		serial := "L" + strconv.Itoa(i)
		d, err := blk.New(f, blk.Options{ReadOnly: true, Serial: serial, Logger: cfg.logger})
		if err != nil {
			return nil, err
		}
		r.devs = append(r.devs, d)
		r.root.Layers = append(r.root.Layers, serial)
	}
	if err := r.addUpper(cfg); err != nil {
		return nil, err
	}
	return r, nil
}

// addUpper makes the ext4 disk of the writable layer when DiskSize asks
// for one.
func (r *rootDisks) addUpper(cfg *config) (err error) {
	r.root.UpperSize = cfg.tmpfsSize
	if cfg.diskSize > 0 {
		r.root.UpperSize = 0
		if r.tmpDir, err = os.MkdirTemp("", "gosandbox-disk-"); err != nil {
			return err
		}
		p := filepath.Join(r.tmpDir, "upper.ext4")
		if err := ext4.CreateFile(p, cfg.diskSize, ext4.Options{}); err != nil {
			return err
		}
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		r.files = append(r.files, f)
		// The file stays open; its name can go now.
		os.Remove(p)
		d, err := blk.New(f, blk.Options{Serial: "upper", Logger: cfg.logger})
		if err != nil {
			return err
		}
		r.devs = append(r.devs, d)
		r.root.Upper = "upper"
	}
	return nil
}
