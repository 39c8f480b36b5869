package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapmeta/storage"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// damageBolt changes the bbolt file at path in fn, as a careless tool or a
// bad disk could.
func damageBolt(t *testing.T, path string, fn func(snaps *bolt.Bucket) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	require.NoError(t, err)
	err = db.Update(func(tx *bolt.Tx) error {
		return fn(tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)))
	})
	require.NoError(t, db.Close())
	require.NoError(t, err)
}

// TestListingsShowReadableRecords: a record that does not decode is
// reported, one line each, and the listings show every other record and
// exit 1.
func TestListingsShowReadableRecords(t *testing.T) {
	path := boltFixture(t)
	want := map[string]string{}
	for _, cmd := range []string{"ls", "tree", "export", "ids"} {
		want[cmd] = ok(t, cmd, "--store", path)
	}
	damageBolt(t, path, func(snaps *bolt.Bucket) error {
		return snaps.Bucket([]byte("scratch")).Put([]byte(storage.KeyKind), []byte{9, 9})
	})
	const bad = `snapmeta: snapshot "scratch" cannot be read: bad "kind": corrupt snapshot metadata` + "\n" +
		"snapmeta: 1 snapshot(s) cannot be read and are left out (see 'snapmeta check')\n"
	for _, tc := range []struct {
		cmd  string
		gone []string // lines of the undamaged output missing now
	}{
		{"ls", []string{"scratch"}},
		{"tree", []string{"scratch"}},
		{"export", []string{`"name":"scratch"`}},
		{"ids", []string{"scratch"}},
	} {
		t.Run(tc.cmd, func(t *testing.T) {
			r := exe(t, tc.cmd, "--store", path)
			assert.Equal(t, 1, r.code)
			assert.Equal(t, bad, r.stderr)
			var kept []string
			for _, line := range strings.SplitAfter(want[tc.cmd], "\n") {
				if !strings.Contains(line, tc.gone[0]) {
					kept = append(kept, line)
				}
			}
			assert.Equal(t, mask(strings.Join(kept, "")), mask(r.stdout))
		})
	}
	r := exe(t, "check", "--store", path)
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stdout, `snapshot "scratch": record does not decode`)
}

// TestInfoOfOrphan: info of a snapshot whose parent is missing shows the
// record, with the chain up to the gap, and says what is wrong (exit 1).
func TestInfoOfOrphan(t *testing.T) {
	path := boltFixture(t)
	damageBolt(t, path, func(snaps *bolt.Bucket) error { return snaps.DeleteBucket([]byte("layer-2")) })
	for _, args := range [][]string{{"info", "layer-3"}, {"info", "web", "--json"}} {
		r := exe(t, append(args, "--store", path)...)
		wantFail(t, r, 1, `snapshot "layer-3": parent "layer-2" does not exist; the parent chain ends there (see 'snapmeta check')`)
		assert.Contains(t, r.stdout, "layer-3")
	}
	r := exe(t, "info", "web", "--store", path)
	assert.Contains(t, r.stdout, "Name:       web\n")
	assert.Contains(t, r.stdout, "Parent IDs: 3\n", "the chain up to the gap")
}

// TestFilterErrors: a filter that does not parse or holds a bad regular
// expression is a usage error, in one line, whatever the store holds.
func TestFilterErrors(t *testing.T) {
	path := boltFixture(t)
	for _, tc := range []struct {
		filter, want string
	}{
		{"name~=[", "invalid regular expression after ~=: missing closing ] in \"[\""},
		{"kind==active,labels.x~=(a", "invalid regular expression after ~=: missing closing ) in \"(a\""},
		{"kind==", "filters: parse error"},
	} {
		t.Run(tc.filter, func(t *testing.T) {
			r := exe(t, "ls", "--store", path, tc.filter)
			wantFail(t, r, 2, tc.want)
			assert.Empty(t, r.stdout)
		})
	}
	// Filters are judged before the store is opened.
	wantFail(t, exe(t, "ls", "--store", filepath.Join(t.TempDir(), "none.db"), "name~=["), 2, "invalid regular expression")
	// A good regular expression works.
	out := ok(t, "ls", "--store", path, "name~=^layer-[12]$")
	assert.Equal(t, 3, strings.Count(out, "\n"), out)
}
