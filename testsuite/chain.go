package testsuite

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// chainDepth is how many committed layers testParentIDChain stacks.
const chainDepth = 128

// reversed returns ids last first.
func reversed(ids []string) []string {
	out := slices.Clone(ids)
	slices.Reverse(out)
	return out
}

// testParentIDChain: ParentIDs lists the whole chain, immediate parent
// first, through chainDepth committed layers.
func testParentIDChain(t *testing.T, open Opener) {
	ms, _ := openStore(t, open)
	var ids []string // ids[i] is the ID of layer i; layer 0 is the base
	layer := func(i int) string { return fmt.Sprintf("layer-%03d", i) }

	// One transaction per layer, as a driver unpacking an image does (and
	// so that no engine hits a per-transaction size limit).
	parent := ""
	for i := range chainDepth {
		inWrite(t, ms, func(ctx context.Context) {
			s := mustCreate(t, ctx, snapshots.KindActive, layer(i)+"-active", parent)
			require.Equal(t, reversed(ids), normIDs(s.ParentIDs), "ParentIDs of the active for layer %d", i)
			id := mustCommit(t, ctx, layer(i)+"-active", layer(i), snapshots.Usage{Size: int64(i)})
			require.Equal(t, s.ID, id, "commit of layer %d changed the ID", i)
			ids = append(ids, id)
		})
		parent = layer(i)
	}
	inWrite(t, ms, func(ctx context.Context) {
		top := mustCreate(t, ctx, snapshots.KindActive, "top", layer(chainDepth-1))
		assert.Len(t, top.ParentIDs, chainDepth)
		assert.Equal(t, reversed(ids), top.ParentIDs, "ParentIDs of the active on top, as created")
	})

	run(t, "GetSnapshot returns the chain of the top active after commit", func(t *testing.T) {
		inRead(t, ms, func(ctx context.Context) {
			s, err := storage.GetSnapshot(ctx, "top")
			require.NoError(t, err)
			assert.Len(t, s.ParentIDs, chainDepth)
			assert.Equal(t, reversed(ids), s.ParentIDs)
		})
	})

	run(t, "every layer's info names its parent and keeps its ID", func(t *testing.T) {
		inRead(t, ms, func(ctx context.Context) {
			for i := range chainDepth {
				id, info, usage := mustGetInfo(t, ctx, layer(i))
				assert.Equal(t, ids[i], id, "ID of layer %d", i)
				want := ""
				if i > 0 {
					want = layer(i - 1)
				}
				assert.Equal(t, want, info.Parent, "parent of layer %d", i)
				assert.Equal(t, int64(i), usage.Size, "usage of layer %d", i)
			}
		})
	})

	run(t, "a view on every layer returns the suffix of the chain", func(t *testing.T) {
		ctx, tx := begin(t, ms, true)
		defer func() { assert.NoError(t, tx.Rollback()) }()
		for i := range chainDepth {
			v := mustCreate(t, ctx, snapshots.KindView, layer(i)+"-view", layer(i))
			if !assert.Equal(t, reversed(ids[:i+1]), v.ParentIDs, "ParentIDs of a view on layer %d", i) {
				break
			}
		}
	})
}

// testRebaseOnCommit: an active created without a parent may be given one on
// commit with snapshots.WithParent; an active with a parent keeps it.
func testRebaseOnCommit(t *testing.T, open Opener) {
	type tc struct {
		name      string
		created   string // parent at creation
		rebase    string // WithParent on commit; "" means no option
		useOpt    bool
		wantClass *errClass
	}
	cases := []tc{
		{name: "parentless active rebased onto a committed parent", created: "", rebase: "base-2", useOpt: true},
		{name: "parentless active rebased onto a base layer", created: "", rebase: "base-1", useOpt: true},
		{name: "WithParent of the same parent is accepted", created: "base-2", rebase: "base-2", useOpt: true},
		{name: "WithParent empty keeps the parent", created: "base-2", rebase: "", useOpt: true},
		{name: "no WithParent keeps the parent", created: "base-2"},
		{name: "different parent is InvalidArgument", created: "base-2", rebase: "base-1", useOpt: true, wantClass: &invalidArgument},
		{name: "missing parent is NotFound", created: "", rebase: "does-not-exist", useOpt: true, wantClass: &notFound},
		{name: "active parent is FailedPrecondition", created: "", rebase: "other-active", useOpt: true, wantClass: &failedPrecondition},
		{name: "view parent is FailedPrecondition", created: "", rebase: "other-view", useOpt: true, wantClass: &failedPrecondition},
	}
	for _, c := range cases {
		run(t, c.name, func(t *testing.T) {
			ms, _ := openStore(t, open)
			ids := map[string]string{}
			var activeID string
			inWrite(t, ms, func(ctx context.Context) {
				ids["base-1"] = mustLayer(t, ctx, "base-1", "", snapshots.Usage{})
				ids["base-2"] = mustLayer(t, ctx, "base-2", "base-1", snapshots.Usage{})
				mustCreate(t, ctx, snapshots.KindActive, "other-active", "base-1")
				mustCreate(t, ctx, snapshots.KindView, "other-view", "")
				activeID = mustCreate(t, ctx, snapshots.KindActive, "rebased-active", c.created).ID
			})
			var opts []snapshots.Opt
			if c.useOpt {
				opts = append(opts, snapshots.WithParent(c.rebase))
			}
			commit := func(ctx context.Context) (string, error) {
				return storage.CommitActive(ctx, "rebased-active", "rebased", snapshots.Usage{Size: 1}, opts...)
			}
			if c.wantClass != nil {
				refusal(t, ms, *c.wantClass, func(ctx context.Context) error {
					_, err := commit(ctx)
					return err
				})
				return
			}

			wantParent := c.created
			if wantParent == "" {
				wantParent = c.rebase
			}
			chainOf := map[string][]string{
				"base-1": {ids["base-1"]},
				"base-2": {ids["base-2"], ids["base-1"]},
			}
			inWrite(t, ms, func(ctx context.Context) {
				id, err := commit(ctx)
				require.NoError(t, err)
				assert.Equal(t, activeID, id, "rebase must keep the ID")
			})
			inWrite(t, ms, func(ctx context.Context) {
				_, info, _ := mustGetInfo(t, ctx, "rebased")
				assert.Equal(t, wantParent, info.Parent, "parent after commit")
				child := mustCreate(t, ctx, snapshots.KindActive, "child", "rebased")
				assert.Equal(t, append([]string{activeID}, chainOf[wantParent]...), child.ParentIDs, "chain of a child of the rebased snapshot")
				again, err := storage.GetSnapshot(ctx, "child")
				if assert.NoError(t, err) {
					assert.Equal(t, child.ParentIDs, again.ParentIDs)
				}
				_, _, err = storage.Remove(ctx, wantParent)
				assertClass(t, err, failedPrecondition, "the new parent must count the rebased snapshot as a child")
			})
			// Removing the rebased snapshot (and its child) unlinks it
			// again: base-2 has no other child and becomes removable.
			inWrite(t, ms, func(ctx context.Context) {
				mustRemove(t, ctx, "child")
				mustRemove(t, ctx, "rebased")
				if wantParent == "base-2" {
					mustRemove(t, ctx, "base-2")
				}
			})
		})
	}
}

// testUsage: usage of a committed snapshot round-trips, including values
// near math.MaxInt64; active and view snapshots report none.
func testUsage(t *testing.T, open Opener) {
	ms, root := openStore(t, open)
	usages := []struct {
		name  string
		usage snapshots.Usage
	}{
		{"zero", snapshots.Usage{}},
		{"small", snapshots.Usage{Size: 1, Inodes: 1}},
		{"size only", snapshots.Usage{Size: 12345}},
		{"inodes only", snapshots.Usage{Inodes: 678}},
		{"above 32 bits", snapshots.Usage{Size: 1<<40 + 3, Inodes: 1<<33 + 1}},
		{"near the maximum", snapshots.Usage{Size: math.MaxInt64 - 1, Inodes: math.MaxInt64 - 2}},
		{"maximum", snapshots.Usage{Size: math.MaxInt64, Inodes: math.MaxInt64}},
	}
	check := func(t *testing.T, ctx context.Context) {
		for i, u := range usages {
			_, _, got := mustGetInfo(t, ctx, fmt.Sprintf("usage-%d", i))
			assert.Equal(t, u.usage, got, "usage %s", u.name)
		}
	}
	ctx, tx := begin(t, ms, true)
	for i, u := range usages {
		mustLayer(t, ctx, fmt.Sprintf("usage-%d", i), "", u.usage)
	}
	run(t, "round trips in the writing transaction", func(t *testing.T) { check(t, ctx) })
	require.NoError(t, tx.Commit())
	run(t, "round trips after commit", func(t *testing.T) {
		inRead(t, ms, func(ctx context.Context) { check(t, ctx) })
	})
	run(t, "round trips after reopening", func(t *testing.T) {
		require.NoError(t, ms.Close())
		ms2 := openAt(t, open, root)
		inRead(t, ms2, func(ctx context.Context) { check(t, ctx) })
	})
}

// testIDMap: IDMap maps every ID to its current name.
func testIDMap(t *testing.T, open Opener) {
	run(t, "maps every ID to its name for all kinds", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		want := map[string]string{}
		for name, id := range f.ids {
			want[id] = name
		}
		require.Len(t, want, len(fixtureSnapshots), "fixture IDs are not unique")
		inRead(t, ms, func(ctx context.Context) {
			got, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.Equal(t, want, got)
		})
	})

	run(t, "after commit maps the ID to the new name", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inWrite(t, ms, func(ctx context.Context) {
			mustCommit(t, ctx, "active-2", "committed-3", snapshots.Usage{})
		})
		inRead(t, ms, func(ctx context.Context) {
			got, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.Equal(t, "committed-3", got[f.ids["active-2"]])
			assert.Len(t, got, len(fixtureSnapshots))
			assert.NotContains(t, values(got), "active-2")
		})
	})

	run(t, "after remove drops the ID", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inWrite(t, ms, func(ctx context.Context) { mustRemove(t, ctx, "view-1") })
		inRead(t, ms, func(ctx context.Context) {
			got, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.NotContains(t, got, f.ids["view-1"])
			assert.Len(t, got, len(fixtureSnapshots)-1)
		})
	})

	run(t, "empty store gives an empty map", func(t *testing.T) {
		ms, _ := openStore(t, open)
		inRead(t, ms, func(ctx context.Context) {
			got, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.Empty(t, got)
		})
	})
}

func values(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// testIDs: IDs are unique, survive commit, and are never handed out twice,
// even after the snapshot holding one is removed.
func testIDs(t *testing.T, open Opener) {
	run(t, "unique across kinds", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		seen := map[string]string{}
		for name, id := range f.ids {
			assert.NotEmpty(t, id, "ID of %q", name)
			if other, dup := seen[id]; dup {
				t.Errorf("%q and %q share ID %s", name, other, id)
			}
			seen[id] = name
		}
	})

	run(t, "stable across commit", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		var created storage.Snapshot
		var committed string
		inWrite(t, ms, func(ctx context.Context) {
			created = mustCreate(t, ctx, snapshots.KindActive, "stable", "committed-2")
			committed = mustCommit(t, ctx, "stable", "stable-committed", snapshots.Usage{})
		})
		assert.Equal(t, created.ID, committed)
		inRead(t, ms, func(ctx context.Context) {
			id, _, _ := mustGetInfo(t, ctx, "stable-committed")
			assert.Equal(t, created.ID, id, "GetInfo ID after commit")
		})
		inWrite(t, ms, func(ctx context.Context) {
			v := mustCreate(t, ctx, snapshots.KindView, "stable-view", "stable-committed")
			assert.Equal(t, created.ID, v.ParentIDs[0], "ParentIDs of a child use the kept ID")
			id, _ := mustRemove(t, ctx, "stable-view")
			assert.Equal(t, v.ID, id)
			id, kind := mustRemove(t, ctx, "stable-committed")
			assert.Equal(t, created.ID, id, "Remove returns the kept ID")
			assert.Equal(t, snapshots.KindCommitted, kind)
		})
	})

	run(t, "never reused after remove", func(t *testing.T) {
		ms, _ := openStore(t, open)
		seen := map[string]bool{}
		fresh := func(id string, what string) {
			t.Helper()
			assert.False(t, seen[id], "ID %s reused by %s", id, what)
			seen[id] = true
		}
		// Across transactions: create, remove, create again.
		for i := range 5 {
			inWrite(t, ms, func(ctx context.Context) {
				fresh(mustCreate(t, ctx, snapshots.KindActive, "again", "").ID, fmt.Sprintf("create %d", i))
			})
			inWrite(t, ms, func(ctx context.Context) { mustRemove(t, ctx, "again") })
		}
		// Within one transaction, including a committed one.
		inWrite(t, ms, func(ctx context.Context) {
			for i := range 5 {
				fresh(mustLayer(t, ctx, "again-committed", "", snapshots.Usage{}), fmt.Sprintf("layer %d", i))
				mustRemove(t, ctx, "again-committed")
				fresh(mustCreate(t, ctx, snapshots.KindView, "again-view", "").ID, fmt.Sprintf("view %d", i))
				mustRemove(t, ctx, "again-view")
			}
		})
		inWrite(t, ms, func(ctx context.Context) {
			fresh(mustCreate(t, ctx, snapshots.KindActive, "last", "").ID, "the last create")
		})
	})
}
