package kernel

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
)

// goEnv resolves go command settings: the process environment first, then
// the go command's environment file (go env -w), as the go command does.
type goEnv struct {
	getenv func(string) string
	file   map[string]string
}

func newGoEnv(getenv func(string) string) *goEnv {
	e := &goEnv{getenv: getenv, file: map[string]string{}}
	path := getenv("GOENV")
	if path == "off" {
		return e
	}
	if path == "" {
		dir, err := os.UserConfigDir()
		if err != nil {
			return e
		}
		path = filepath.Join(dir, "go", "env")
	}
	f, err := os.Open(path)
	if err != nil {
		return e
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if ok && k != "" && !strings.HasPrefix(k, "#") {
			e.file[k] = v
		}
	}
	return e
}

func (e *goEnv) get(key string) string {
	if v := e.getenv(key); v != "" {
		return v
	}
	return e.file[key]
}

// modCache returns GOMODCACHE as `go env GOMODCACHE` would: $GOMODCACHE,
// else the first GOPATH entry's pkg/mod, else $HOME/go/pkg/mod.
func (e *goEnv) modCache() string {
	if v := e.get("GOMODCACHE"); v != "" {
		return v
	}
	if gp := e.get("GOPATH"); gp != "" {
		if first := filepath.SplitList(gp)[0]; first != "" {
			return filepath.Join(first, "pkg", "mod")
		}
	}
	home := e.getenv("HOME")
	if home == "" {
		home, _ = os.UserHomeDir()
	}
	if home == "" {
		return ""
	}
	return filepath.Join(home, "go", "pkg", "mod")
}

// defaultGOPROXY is the go command's default.
const defaultGOPROXY = "https://proxy.golang.org,direct"

func (e *goEnv) proxy() string {
	if v := e.get("GOPROXY"); v != "" {
		return v
	}
	return defaultGOPROXY
}

// proxyEntry is one element of a GOPROXY list.
type proxyEntry struct {
	url string
	// anyErr: on any failure fall through to the next entry ('|'),
	// otherwise only on 404/410 (',').
	anyErr bool
}

// parseGOPROXY splits a GOPROXY value into entries with their fallback rule.
func parseGOPROXY(list string) []proxyEntry {
	var out []proxyEntry
	for list != "" {
		i := strings.IndexAny(list, ",|")
		var item string
		anyErr := false
		if i < 0 {
			item, list = list, ""
		} else {
			item, anyErr, list = list[:i], list[i] == '|', list[i+1:]
		}
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		out = append(out, proxyEntry{url: strings.TrimRight(item, "/"), anyErr: anyErr})
	}
	return out
}
