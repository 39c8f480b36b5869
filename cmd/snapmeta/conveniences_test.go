package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage/etcdtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// checkResult is what check --json writes.
type checkResult struct {
	OK        bool `json:"ok"`
	Snapshots *int `json:"snapshots"`
	Problems  []struct {
		Snapshot   string `json:"snapshot"`
		Detail     string `json:"detail"`
		PageDamage bool   `json:"page_damage"`
	} `json:"problems"`
}

// lines is what check without --json writes for the same problems.
func (r checkResult) lines() string {
	var b strings.Builder
	for _, p := range r.Problems {
		switch {
		case p.PageDamage:
			b.WriteString("page damage: " + p.Detail)
		case p.Snapshot == "":
			b.WriteString(p.Detail)
		default:
			fmt.Fprintf(&b, "snapshot %q: %s", p.Snapshot, p.Detail)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// TestCheckJSON: check --json reports the same problems as the text, in
// the same order, with the exit codes unchanged.
func TestCheckJSON(t *testing.T) {
	clean := boltFixture(t)
	broken := boltFixture(t)
	damageBolt(t, broken, func(snaps *bolt.Bucket) error { return snaps.DeleteBucket([]byte("layer-3")) })
	for _, tc := range []struct {
		name     string
		store    string
		code     int
		ok       bool
		problems int
	}{
		{"clean", clean, 0, true, 0},
		{"parent removed", broken, 1, false, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := exe(t, "check", "--store", tc.store, "--json")
			require.Equal(t, tc.code, r.code, r.stderr)
			var got checkResult
			require.NoError(t, json.Unmarshal([]byte(r.stdout), &got), r.stdout)
			assert.Equal(t, tc.ok, got.OK)
			require.NotNil(t, got.Problems, "problems is [] on a clean store, not null")
			assert.Len(t, got.Problems, tc.problems)
			require.NotNil(t, got.Snapshots)
			text := exe(t, "check", "--store", tc.store)
			if tc.ok {
				assert.Equal(t, fmt.Sprintf("ok: %d snapshots, no problems\n", *got.Snapshots), text.stdout)
				assert.Empty(t, r.stderr)
			} else {
				assert.Equal(t, text.stdout, got.lines())
				assert.Equal(t, text.stderr, r.stderr)
			}
		})
	}
	r := exe(t, "check", "--store", filepath.Join(t.TempDir(), "none.db"), "--json")
	wantFail(t, r, 2, "does not exist")
	assert.Empty(t, r.stdout, "an unreadable store writes no JSON")
}

// TestStoreArgument: the store may be the argument of the commands that
// take no other (and the first of ls's); it means what --store means,
// wins over $SNAPMETA_STORE, and must agree with --store.
func TestStoreArgument(t *testing.T) {
	path := boltFixture(t)
	other := boltWith(t, "b")
	for _, tc := range []struct {
		cmd  []string // the command, then its flags
		env  []string
		want []string // the same command with --store path
	}{
		{[]string{"ls", path}, nil, []string{"ls"}},
		{[]string{"ls", "bolt://" + path, "-q", "kind==view"}, nil, []string{"ls", "-q", "kind==view"}},
		{[]string{"ls", path, "kind==view", "name==layer-1", "--json"}, nil, []string{"ls", "kind==view", "name==layer-1", "--json"}},
		{[]string{"ls", path}, []string{"SNAPMETA_STORE=" + other}, []string{"ls"}},
		{[]string{"ls", "-q", "kind==view"}, []string{"SNAPMETA_STORE=" + path}, []string{"ls", "-q", "kind==view"}},
		{[]string{"ls", path, "--store", "bolt://" + path}, nil, []string{"ls"}},
		{[]string{"tree", path}, nil, []string{"tree"}},
		{[]string{"ids", path, "--json"}, nil, []string{"ids", "--json"}},
		{[]string{"check", path}, []string{"SNAPMETA_STORE=" + other}, []string{"check"}},
		{[]string{"export", path}, nil, []string{"export"}},
	} {
		t.Run(strings.Join(tc.cmd, "_"), func(t *testing.T) {
			r := snapmeta(t, "", tc.env, tc.cmd...)
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, r.stderr)
			assert.Equal(t, mask(ok(t, append(tc.want, "--store", path)...)), mask(r.stdout))
		})
	}
	missing := filepath.Join(t.TempDir(), "none.db")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ls", other, "--store", path}, "two stores given: --store " + path + " and " + other},
		{[]string{"check", "--store", path, other}, "two stores given"},
		{[]string{"tree", path, other}, "snapmeta tree takes at most one argument, the STORE"},
		{[]string{"ls", missing}, `is neither a file that exists nor a filter`},
		{[]string{"ls", "none.db"}, `no store given ("none.db" names no file that exists, so it was taken as a filter)`},
		{[]string{"ls", "etc://h:2379/x"}, `unknown store address scheme "etc"`},
		{[]string{"check", "etcd://h/x"}, `etcd endpoint "h" of store address "etcd://h/x" has no port`},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			wantFail(t, exe(t, tc.args...), 2, tc.want)
		})
	}
}

// TestStoreArgumentEtcd: an etcd address as the argument.
func TestStoreArgumentEtcd(t *testing.T) {
	c := etcdtest.Start(t)
	addr, ms := etcdStore(t, c, "arg")
	fixture(t, ms)
	assert.Equal(t, "ok: 7 snapshots, no problems\n", ok(t, "check", addr))
	assert.Equal(t, ok(t, "ls", "--store", addr, "kind==active"), ok(t, "ls", addr, "kind==active"))
}

// TestBytes: -b writes sizes as byte counts in ls's table and in info.
func TestBytes(t *testing.T) {
	path := boltFixture(t)
	want := map[string]string{"layer-1": "1048576", "layer-2": "5243003", "layer-3": "2048", "other-2": "700", "scratch": "-", "web": "-", "web-view": "-"}
	for _, tc := range []struct {
		args []string
		env  []string
	}{
		{[]string{"-b"}, nil},
		{[]string{"--bytes"}, nil},
		{nil, []string{"SNAPMETA_BYTES=true"}},
	} {
		t.Run(strings.Join(append(tc.args, tc.env...), "_"), func(t *testing.T) {
			r := snapmeta(t, "", tc.env, append([]string{"ls", path, "--no-headers"}, tc.args...)...)
			require.Equal(t, 0, r.code, r.stderr)
			got := map[string]string{}
			for _, line := range strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n") {
				f := strings.Fields(line)
				require.Len(t, f, 6, "KIND NAME PARENT ID SIZE CREATED: %q", line)
				got[f[1]] = f[4]
			}
			assert.Equal(t, want, got)

			r = snapmeta(t, "", tc.env, append([]string{"info", "--store", path, "layer-2"}, tc.args...)...)
			require.Equal(t, 0, r.code, r.stderr)
			assert.Regexp(t, `(?m)^Size:\s+5243003\n`, r.stdout)
			r = snapmeta(t, "", tc.env, append([]string{"info", "--store", path, "web"}, tc.args...)...)
			require.Equal(t, 0, r.code, r.stderr)
			assert.Regexp(t, `(?m)^Size:\s+- \(known once committed\)\n`, r.stdout)
		})
	}
	// Without -b: IEC units, and info adds the byte count.
	assert.Contains(t, ok(t, "ls", path, "name==layer-2"), "5.0 MiB")
	assert.Regexp(t, `(?m)^Size:\s+5\.0 MiB \(5243003 bytes\)\n`, ok(t, "info", "--store", path, "layer-2"))
}

// TestCompletion: each shell's script is written and parses in that shell
// (where it is installed), and the command it calls back answers.
func TestCompletion(t *testing.T) {
	for _, tc := range []struct {
		shell, want string
	}{
		{"bash", "__start_snapmeta"},
		{"zsh", "#compdef snapmeta"},
		{"fish", "complete -c snapmeta"},
	} {
		t.Run(tc.shell, func(t *testing.T) {
			script := ok(t, "completion", tc.shell)
			assert.Contains(t, script, tc.want)
			sh, err := exec.LookPath(tc.shell)
			if err != nil {
				t.Logf("%s not installed: the script's syntax is not checked", tc.shell)
				return
			}
			file := filepath.Join(t.TempDir(), "snapmeta."+tc.shell)
			require.NoError(t, os.WriteFile(file, []byte(script), 0o600))
			out, err := exec.Command(sh, "-n", file).CombinedOutput()
			assert.NoError(t, err, "%s -n: %s", tc.shell, out)
		})
	}
	// What the scripts ask the binary.
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"__complete", "che"}, []string{"check\t"}},
		{[]string{"__complete", "completion", ""}, []string{"bash\n", "zsh\n", "fish\n"}},
		{[]string{"__complete", "ls", "--by"}, []string{"--bytes\t"}},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			// Cobra reports the directive on stderr.
			r := exe(t, tc.args...)
			require.Equal(t, 0, r.code, r.stderr)
			for _, w := range tc.want {
				assert.Contains(t, r.stdout, w)
			}
		})
	}
	for _, args := range [][]string{{"completion"}, {"completion", "tcsh"}, {"completion", "bash", "zsh"}} {
		t.Run(strings.Join(args, "_"), func(t *testing.T) {
			wantFail(t, exe(t, args...), 2, "bash, zsh or fish")
		})
	}
}
