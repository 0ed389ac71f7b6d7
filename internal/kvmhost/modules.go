package kvmhost

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// moduleIndex knows where each loadable kernel module lives and what it
// depends on: the content of a depmod-style modules.dep plus
// modules.builtin. The kernel .deb ships no modules.dep (depmod writes it at
// install time), so buildModuleIndex makes one from each module's .modinfo
// section, and the cache stores it in the same text format.
type moduleIndex struct {
	path    map[string]string   // module name -> path relative to lib/modules/<release>
	deps    map[string][]string // module name -> names of the modules it needs
	builtin map[string]bool     // module names built into the kernel
}

func newModuleIndex() *moduleIndex {
	return &moduleIndex{path: map[string]string{}, deps: map[string][]string{}, builtin: map[string]bool{}}
}

// moduleName turns a module path or name into the kernel's canonical module
// name: base name, no .ko suffix, '-' as '_'.
func moduleName(p string) string {
	n := path.Base(p)
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(n, ext) {
			n = strings.TrimSuffix(n, ext)
			break
		}
	}
	return strings.ReplaceAll(n, "-", "_")
}

// parseModulesDep reads a modules.dep: lines "path.ko: dep.ko dep2.ko".
func parseModulesDep(r io.Reader) (*moduleIndex, error) {
	ix := newModuleIndex()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		p, rest, ok := strings.Cut(text, ":")
		p = strings.TrimSpace(p)
		if !ok || p == "" || !strings.Contains(path.Base(p), ".ko") {
			return nil, fmt.Errorf("modules.dep line %d: want \"module.ko: deps...\", got %q", line, text)
		}
		if !validModPath(p) {
			return nil, fmt.Errorf("modules.dep line %d: bad module path %q", line, p)
		}
		name := moduleName(p)
		if _, dup := ix.path[name]; dup {
			return nil, fmt.Errorf("modules.dep line %d: module %s listed twice", line, name)
		}
		ix.path[name] = p
		var deps []string
		for _, d := range strings.Fields(rest) {
			if !validModPath(d) {
				return nil, fmt.Errorf("modules.dep line %d: bad dependency path %q", line, d)
			}
			deps = append(deps, moduleName(d))
		}
		ix.deps[name] = deps
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	return ix, nil
}

// validModPath accepts relative, clean paths without "..".
func validModPath(p string) bool {
	return p != "" && !path.IsAbs(p) && path.Clean(p) == p && !strings.HasPrefix(p, "../") && p != ".." && !strings.ContainsAny(p, "\x00\n")
}

// parseBuiltin reads modules.builtin (one module path a line).
func (ix *moduleIndex) parseBuiltin(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if t := strings.TrimSpace(sc.Text()); t != "" {
			ix.builtin[moduleName(t)] = true
		}
	}
	return sc.Err()
}

// writeModulesDep writes the index in modules.dep format, sorted by path.
// Dependencies are listed with their paths; a dependency the index does not
// know is written as "<name>.ko" so that parsing it back keeps the name.
func (ix *moduleIndex) writeModulesDep(w io.Writer) error {
	names := make([]string, 0, len(ix.path))
	for n := range ix.path {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int { return strings.Compare(ix.path[a], ix.path[b]) })
	bw := bufio.NewWriter(w)
	for _, n := range names {
		bw.WriteString(ix.path[n])
		bw.WriteString(":")
		for _, d := range ix.deps[n] {
			p, ok := ix.path[d]
			if !ok {
				p = d + ".ko"
			}
			bw.WriteString(" ")
			bw.WriteString(p)
		}
		bw.WriteString("\n")
	}
	return bw.Flush()
}

// resolve returns the module paths to load, in load order (dependencies
// first), for the wanted module names. Built-in modules are skipped. Unknown
// modules and dependency cycles are errors.
func (ix *moduleIndex) resolve(want []string) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("kernel module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		}
		p, ok := ix.path[name]
		if !ok {
			if ix.builtin[name] {
				state[name] = done
				return nil
			}
			if len(chain) > 0 {
				return fmt.Errorf("kernel module %s (needed by %s) is neither a module nor built in", name, chain[len(chain)-1])
			}
			return fmt.Errorf("kernel module %s is neither a module nor built in", name)
		}
		state[name] = visiting
		for _, d := range ix.deps[name] {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, p)
		return nil
	}
	for _, w := range want {
		if err := visit(moduleName(w), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modinfoDepends returns the "depends=" list from an ELF kernel module's
// .modinfo section.
func modinfoDepends(r io.ReaderAt) ([]string, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("not an ELF kernel module: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("kernel module has no .modinfo section")
	}
	if sec.Size > 1<<20 {
		return nil, fmt.Errorf(".modinfo section of %d bytes is implausibly large", sec.Size)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("reading .modinfo: %w", err)
	}
	return parseModinfoDepends(data), nil
}

// parseModinfoDepends extracts module names from the NUL-separated
// key=value strings of a .modinfo section.
func parseModinfoDepends(data []byte) []string {
	var deps []string
	for _, kv := range bytes.Split(data, []byte{0}) {
		v, ok := bytes.CutPrefix(kv, []byte("depends="))
		if !ok {
			continue
		}
		for _, d := range strings.Split(string(v), ",") {
			if d = strings.TrimSpace(d); d != "" && !slices.Contains(deps, moduleName(d)) {
				deps = append(deps, moduleName(d))
			}
		}
	}
	return deps
}

// buildModuleIndex walks an unpacked lib/modules/<release> directory and
// indexes every .ko under it by reading its .modinfo.
func buildModuleIndex(fsys fs.FS) (*moduleIndex, error) {
	ix := newModuleIndex()
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		f, err := fsys.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		ra, ok := f.(io.ReaderAt)
		if !ok {
			return fmt.Errorf("%s: file system does not support ReadAt", p)
		}
		deps, err := modinfoDepends(ra)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		name := moduleName(p)
		if prev, dup := ix.path[name]; dup {
			return fmt.Errorf("module %s found twice: %s and %s", name, prev, p)
		}
		ix.path[name] = p
		ix.deps[name] = deps
		return nil
	})
	if err != nil {
		return nil, err
	}
	if b, err := fs.ReadFile(fsys, "modules.builtin"); err == nil {
		if err := ix.parseBuiltin(bytes.NewReader(b)); err != nil {
			return nil, err
		}
	}
	return ix, nil
}

var _ = filepath.Join
