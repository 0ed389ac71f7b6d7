// Package kernel finds, verifies and prepares the guest kernel.
//
// The default guest kernel is the bzImage in the Go module
// github.com/gokrazy/kernel.amd64 at a pinned version (Version, Sum). A Go
// library cannot go:embed a file of another module, so Default looks for it
// where the go command would have put it, in this order:
//
//  1. this package's own cache (os.UserCacheDir()/gosandbox/kernel), filled
//     by an earlier call: a small record and a few stat calls, no hashing;
//  2. the extracted module in the Go module cache
//     ($GOMODCACHE/github.com/gokrazy/kernel.amd64@VERSION);
//  3. the module zip in the Go module cache
//     ($GOMODCACHE/cache/download/github.com/gokrazy/kernel.amd64/@v/VERSION.zip);
//  4. a download of that zip from the Go module proxies in GOPROXY.
//
// Whatever the source, the module's files are checked against the pinned h1:
// hash (golang.org/x/mod/sumdb/dirhash, the go.sum algorithm) before the
// kernel is used, and the verified kernel is copied into the cache. GOMODCACHE,
// GOPATH and GOPROXY are read from the environment, then from the go command's
// environment file (go env -w), with the go command's defaults.
//
// Both Default and FromFile (a caller's own bzImage or vmlinux) then cut the
// uncompressed vmlinux ELF out of a bzImage once, with package
// vmm/linuxboot, and cache it by the SHA-256 of the bzImage, so that every
// boot loads ELF segments directly instead of running the kernel's
// decompressor. Cache files are written to temporary names and renamed into
// place; a file lock (flock) on the cache directory makes concurrent callers,
// in one process or many, extract each kernel once.
package kernel
