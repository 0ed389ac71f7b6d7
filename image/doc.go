// Package image turns OCI images into what a gosandbox guest boots from:
// it pulls images from registries (or loads them from Docker/OCI archives),
// keeps them in a content-addressed cache shared by all sandboxes and
// processes of a user, converts every layer once into a read-only SquashFS
// block image, and applies an image's config to commands.
//
// # Pulling and the cache
//
//	st, _ := image.Open()                         // os.UserCacheDir()/gosandbox/images
//	img, err := st.Pull(ctx, "python:3.12-slim")  // PullIfMissing by default
//	paths := img.LayerPaths()                     // SquashFS files, top layer first
//
// Pull uses github.com/google/go-containerregistry for the registry protocol
// (auth from the Docker config and credential helpers through
// authn.DefaultKeychain, or WithCredentials/WithAuth; plain HTTP and
// unverified TLS only with WithInsecure; multi-platform indexes resolved to
// linux/amd64). Layers are fetched WithJobs at a time (default 4), each in one
// streaming pass: the compressed bytes are hashed against the manifest digest
// and spooled to the cache, decompressed (gzip, zstd or plain tar, by magic
// number), hashed against the config's diff_id and converted to SquashFS.
// Anything that does not verify is discarded and reported as a *DigestError
// (errors.Is(err, ErrDigestMismatch)). Progress goes to a WithProgress
// callback (per-layer bytes done/total, calls serialized).
//
// The cache (see Store) is safe for several processes: files are written under
// tmp/ and renamed into place, layer conversion is serialized per diff_id with
// flock(2), and Prune/Remove take an exclusive lock that Pull and Load hold
// shared. PullNever fails with ErrNotPresent when the image is missing.
// Store.Load and Store.Save read and write Docker archives and OCI-layout
// tarballs; Save writes the cached blobs unchanged, so digests survive a
// save/load round trip.
//
// All methods take a context for the call; nothing stores one. A Store owns
// no goroutines or open files between calls. Logging goes to an injected
// *slog.Logger (WithLogger) and is silent by default.
//
// # Layer images: format and why
//
// The default guest kernel (gokrazy kernel.amd64) has squashfs (zlib only),
// ext4 and overlayfs built in, but not erofs. Each layer becomes one SquashFS
// 4.0 image compressed with zlib (package image/squashfs, written in Go by
// this module; see its package doc for why go-diskfs did not fit). SquashFS
// rather than ext4 because it is compressed (a layer image is about the size
// of the gzip blob, not of the unpacked tree), read-only by design, simple to
// write in one streaming pass, and byte-for-byte deterministic. Images are
// named by the layer's diff_id, so images sharing a base layer share its file.
//
// Conversion (ConvertLayer) keeps permissions (setuid/setgid/sticky
// included), uid/gid, mtimes (seconds), symlinks, hard links (one inode),
// character and block devices, FIFOs, and xattrs in the user., trusted. and
// security. namespaces. OCI whiteouts become overlayfs whiteouts: ".wh.NAME"
// is stored as a character device 0/0 named NAME, and ".wh..wh..opq" as the
// xattr trusted.overlay.opaque="y" on its directory. Xattrs SquashFS cannot
// store (system.*, i.e. POSIX ACLs) and any trusted.overlay.* xattr carried by
// the layer itself are dropped (counted in LayerStats.DroppedXattrs): a forged
// overlay redirect or metacopy xattr must not steer the guest's overlayfs.
// Alongside each image the cache keeps a small index of the layer (every
// path with its kind: directory, other, whiteout, opaque marker; prefix
// compressed, checksummed), written in the same pass.
// Parent directories a layer does not list get mode 0755, owner 0:0, mtime 0;
// since the upper directory's metadata wins in overlayfs, layers should list
// the parents of what they change (every common image builder does).
//
// Layers are untrusted. Absolute paths and ".." fail with ErrUnsafePath; hard
// links that leave the layer, point forward or at a directory, and paths that
// go through a symlink or a file fail with ErrLinkEscape; a repeated
// non-directory path (or a file and its whiteout) with ErrDuplicateEntry;
// malformed or oversized headers (names over 4096 bytes, components over 256,
// over 2^21 entries, over 64 KiB of xattrs per entry, sparse files expanding
// beyond 1 GiB) with ErrInvalidLayer; short streams with ErrTruncated. Each is
// wrapped in a *LayerError naming the entry. Nothing is ever extracted to the
// host file system: a layer only becomes bytes in one SquashFS file under the
// cache's tmp/ directory, renamed into place after every check passed.
//
// # Opaque directories and the default guest kernel
//
// The default guest kernel is built without CONFIG_SQUASHFS_XATTR, so its
// squashfs shows no xattrs at all and overlayfs never sees
// trusted.overlay.opaque: on its own, a directory made opaque by an upper
// layer would still show the lower layers' entries. Whiteouts (character
// devices 0/0) do work, being inode types. So when an image is pulled or
// loaded, every layer with opaque directories gets a variant for that
// image's stack of layers: its SquashFS image plus, in each opaque
// directory D (and in each directory under D that the layer also has, since
// overlayfs merges directories of the same name), a whiteout for every name
// the merged view of the layers below shows there and the layer does not
// list itself. The whiteouts are computed from the layer indexes, and the
// variant is converted again from the cached blob (digest and diff_id
// checked again). It depends on the layers below, so it is cached under
// the layer's OCI ChainID (layers/chain/<hex>.sqfs), built once under a
// per-chain flock and renamed into place like everything else. Layers
// without opaque directories, and those whose opaque directories hide
// nothing, keep their shared diff_id image (a marker records the latter).
// Layer.ChainID names the chain; Layer.Path and Image.LayerPaths give the
// image to attach.
//
// A variant carries no trusted.overlay.opaque xattr: a kernel that honours
// it does not merge an opaque directory, and would then list the whiteouts
// in it as entries that cannot be opened. Without the xattr, the whiteouts
// alone give the same tree on every kernel. The shared images keep the
// xattr (right for kernels with squashfs xattrs).
//
// The other consequence of a kernel without squashfs xattrs: no xattr of
// any layer is visible in the guest. File capabilities
// (security.capability, e.g. ping's cap_net_raw), user.* and trusted.*
// xattrs are in the images but the default kernel does not show them;
// programs that rely on file capabilities must run as root there. A guest
// kernel with CONFIG_SQUASHFS_XATTR=y sees them all.
//
// # What the guest must do with the images
//
// The host attaches, for a sandbox of image img:
//
//   - one read-only virtio-blk device per entry of img.LayerPaths() (top layer
//     first), each backed by the SquashFS file as is (the files are padded to
//     4 KiB; no partition table). Use exactly these paths: for a layer with
//     opaque directories that is the image's variant, not the layer's shared
//     diff_id image (which only a kernel with squashfs xattrs reads right). Give each device a serial the agent can map
//     back to its layer position (for example "L<index>"), or pass the
//     device order in the agent's boot request.
//   - for the writable layer, either nothing (tmpfs upper) or one read-write
//     virtio-blk device backed by a sparse file of the chosen size holding an
//     empty ext4 file system (see the note on ext4 below).
//
// Inside the guest, the agent (running as root with CAP_SYS_ADMIN, which
// overlayfs needs for trusted.* xattrs) then does, for layers L0 (top) .. Ln
// (base):
//
//	mount -t squashfs -o ro /dev/vdX /l/<i>        # one per layer, short paths
//	mount -t tmpfs -o size=<N>,mode=0755 tmpfs /u  # or: mount -t ext4 /dev/vdY /u
//	mkdir -p /u/upper /u/work
//	mount -t overlay overlay \
//	    -o lowerdir=/l/0:/l/1:...:/l/n,upperdir=/u/upper,workdir=/u/work,redirect_dir=off,index=off,metacopy=off \
//	    /newroot
//
// lowerdir lists the top layer first. Keep mount points short: the option
// string is limited to one page (or use fsconfig "lowerdir+" on Linux 6.5+);
// overlayfs stacks at most 500 lower layers. The squashfs mounts may add
// nodev,nosuid (overlayfs detects whiteouts by inode type, not by opening
// them). Files written by the sandbox go to the upper directory only; the
// layer images are never modified and can back any number of sandboxes at
// once.
//
// Empty ext4 for the upper layer: package image/ext4 formats one in Go
// (ext4.CreateFile(path, size, ext4.Options{}) makes a sparse file; only
// metadata is allocated). The default can stay a tmpfs upper (bounded by its
// size= option and guest RAM).
//
// TestKernelOverlayMatchesReference runs this recipe on the host (root, loop
// devices) for an image pulled into a Store, with opaque directories in
// two layers: the Linux kernel mounts img.LayerPaths() as SquashFS and the
// ext4 upper, overlayfs stacks them, and the merged tree equals a reference
// extraction of the layer tars, both with the opaque xattr honoured and
// with overlayfs made to ignore it (mount option userxattr, which looks
// for user.overlay.* instead), the latter standing for the default guest
// kernel. A control mount of the shared images in the second mode shows
// the hidden entries, so that mode does test the whiteouts.
//
// # Commands
//
// CommandFor applies an image's Entrypoint, Cmd, Env, WorkingDir and User
// together with the caller's Overrides, the way docker run does, and yields
// the argv, environment, working directory and user spec for the agent to
// exec. User names are resolved in the guest against the image's
// /etc/passwd and /etc/group.
//
// # Lazy eStargz images
//
// Store.OpenLazy opens an eStargz image (every layer descriptor carries the
// containerd.io/snapshot/stargz/toc.digest annotation; otherwise
// ErrNotLazy) without downloading its layers. It fetches each layer's footer
// and table of contents with HTTP range requests
// (github.com/containerd/stargz-snapshotter/estargz parses them), checks the
// TOC against the digest the manifest pins, and then serves the merged tree
// (whiteouts and opaque directories applied) through Lookup, ReadDir, Open and
// ReadFile. File contents are fetched on demand in 256 KiB pages, at most 16
// MiB per request, kept in a sparse scratch file, and every chunk is verified
// against its TOC digest before a byte is returned (ErrDigestMismatch
// otherwise). Prefetch fetches, in one request per layer, everything the
// image builder placed before the ".prefetch.landmark" entry.
//
// Package image/lazy9p serves a LazyImage as a read-only 9P2000.L tree
// (github.com/hugelgupf/p9), tested with a real 9P client. The
// virtio-9p device (package virtio/p9) serves it to the guest, which
// mounts it (mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose
// <tag> /l/0) as the overlayfs lower layer, so the sandbox boots before
// the image is downloaded (sandbox.LazyImage). Caveats: a lazily read layer's diff_id cannot be checked
// until the whole layer has been read (integrity rests on the TOC digest in
// the manifest and the per-chunk digests); a caller's context bounds each
// call but cannot interrupt one range request already in flight (Close does).
// A full Pull of an eStargz image works as for any gzip image; the TOC and
// landmark entries are left out of the SquashFS image.
package image
