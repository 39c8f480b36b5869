package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

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
