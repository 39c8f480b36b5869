package testsuite

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// testGetInfo: GetInfo returns every field of a stored snapshot, and
// NotFound for a missing one.
func testGetInfo(t *testing.T, open Opener) {
	run(t, "returns ID, kind, name, parent, labels, timestamps and usage of every snapshot", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			for _, spec := range fixtureSnapshots {
				run(t, spec.name, func(t *testing.T) {
					id, info, usage, err := storage.GetInfo(ctx, spec.name)
					require.NoError(t, err)
					assert.Equal(t, f.ids[spec.name], id, "ID")
					assert.Equal(t, spec.kind, info.Kind, "kind")
					assert.Equal(t, spec.name, info.Name, "name")
					assert.Equal(t, spec.parent, info.Parent, "parent")
					assert.Equal(t, normLabels(spec.labels), normLabels(info.Labels), "labels")
					assert.Equal(t, spec.usage, usage, "usage (zero for active and view)")
					assertStamps(t, info, f.start, f.end)
				})
			}
		})
	})

	run(t, "returned labels do not alias stored ones", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			_, info, _ := mustGetInfo(t, ctx, "committed-1")
			require.NotNil(t, info.Labels)
			info.Labels["foo"] = "mutated"
			info.Labels["added"] = "yes"
			_, again, _ := mustGetInfo(t, ctx, "committed-1")
			assert.Equal(t, map[string]string{"foo": "bar", "tier": "base"}, normLabels(again.Labels))
		})
	})

	run(t, "missing snapshot is NotFound", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			_, _, _, err := storage.GetInfo(ctx, "does-not-exist")
			assertClass(t, err, notFound)
		})
	})

	run(t, "empty store is NotFound", func(t *testing.T) {
		ms, _ := openStore(t, open)
		inRead(t, ms, func(ctx context.Context) {
			_, _, _, err := storage.GetInfo(ctx, "active-1")
			assertClass(t, err, notFound)
		})
	})
}

// walkNames returns the names WalkInfo visits, in visiting order.
func walkNames(ctx context.Context, filters ...string) ([]string, error) {
	var names []string
	err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
		names = append(names, info.Name)
		return nil
	}, filters...)
	return names, err
}

// testWalkInfo: WalkInfo visits each matching snapshot once, in name order,
// with containerd's filter semantics; a callback error stops it.
func testWalkInfo(t *testing.T, open Opener) {
	all := []string{"active-1", "active-2", "active-3", "committed-1", "committed-2", "view-1", "view-2"}

	run(t, "visits every snapshot once in name order with the same info as GetInfo", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			var names []string
			err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
				names = append(names, info.Name)
				// The callback may use the walking transaction.
				_, got, _, err := storage.GetInfo(ctx, info.Name)
				if assert.NoError(t, err, "GetInfo of %q inside the walk", info.Name) {
					assert.Equal(t, got.Kind, info.Kind, "kind of %q", info.Name)
					assert.Equal(t, got.Parent, info.Parent, "parent of %q", info.Name)
					assert.Equal(t, normLabels(got.Labels), normLabels(info.Labels), "labels of %q", info.Name)
					assert.True(t, got.Created.Equal(info.Created), "Created of %q", info.Name)
					assert.True(t, got.Updated.Equal(info.Updated), "Updated of %q", info.Name)
				}
				return nil
			})
			require.NoError(t, err)
			assert.Equal(t, all, names)
		})
	})

	run(t, "filters", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		cases := []struct {
			name    string
			filters []string
			want    []string
		}{
			{"no filter matches all", nil, all},
			{"kind==committed", []string{"kind==committed"}, []string{"committed-1", "committed-2"}},
			{"kind==active", []string{"kind==active"}, []string{"active-1", "active-2", "active-3"}},
			{"kind==view", []string{"kind==view"}, []string{"view-1", "view-2"}},
			{"kind!=committed", []string{"kind!=committed"}, []string{"active-1", "active-2", "active-3", "view-1", "view-2"}},
			{"name equality", []string{"name==active-2"}, []string{"active-2"}},
			{"name regexp", []string{"name~=^view-"}, []string{"view-1", "view-2"}},
			{"parent equality", []string{"parent==committed-1"}, []string{"active-2", "committed-2"}},
			{"label value", []string{"labels.foo==bar"}, []string{"active-1", "committed-1", "view-2"}},
			{"label presence", []string{"labels.foo"}, []string{"active-1", "committed-1", "committed-2", "view-2"}},
			{"label presence of a rare label", []string{"labels.tier"}, []string{"committed-1"}},
			{"quoted label key with a dot", []string{`labels."dotted.key"==v`}, []string{"view-2"}},
			{"comma is AND", []string{"kind==committed,labels.foo==bar"}, []string{"committed-1"}},
			{"comma is AND on parent and kind", []string{"parent==committed-2,kind==view"}, []string{"view-2"}},
			{"several filter strings are OR", []string{"kind==view", "labels.foo==bar"}, []string{"active-1", "committed-1", "view-1", "view-2"}},
			{"OR of names with one matching nothing", []string{"name==active-1", "name==active-2", "name==nope"}, []string{"active-1", "active-2"}},
			{"no match visits nothing", []string{"name==nope"}, nil},
		}
		for _, tc := range cases {
			run(t, tc.name, func(t *testing.T) {
				inRead(t, ms, func(ctx context.Context) {
					got, err := walkNames(ctx, tc.filters...)
					require.NoError(t, err, "filters %q", tc.filters)
					assert.Equal(t, tc.want, got, "filters %q", tc.filters)
				})
			})
		}
	})

	run(t, "callback error stops the walk and is returned", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		errStop := errors.New("stop walking")
		for _, stopAt := range []int{1, 3, len(all)} {
			inRead(t, ms, func(ctx context.Context) {
				calls := 0
				err := storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error {
					calls++
					if calls == stopAt {
						return errStop
					}
					return nil
				})
				assert.ErrorIs(t, err, errStop, "stop at call %d", stopAt)
				assert.Equal(t, stopAt, calls, "calls after an error at call %d", stopAt)
			})
		}
	})

	run(t, "unparsable filter is InvalidArgument and calls nothing", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		for _, bad := range [][]string{{"kind=="}, {"==committed"}, {"kind==committed", "name~="}, {"kind==committed,"}} {
			inRead(t, ms, func(ctx context.Context) {
				calls := 0
				err := storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error {
					calls++
					return nil
				}, bad...)
				assertClass(t, err, invalidArgument, "filters %q", bad)
				assert.Zero(t, calls, "filters %q", bad)
			})
		}
	})

	run(t, "empty store returns nil without calls", func(t *testing.T) {
		ms, _ := openStore(t, open)
		inRead(t, ms, func(ctx context.Context) {
			for _, fs := range [][]string{nil, {"kind==committed"}} {
				got, err := walkNames(ctx, fs...)
				assert.NoError(t, err, "filters %q", fs)
				assert.Empty(t, got, "filters %q", fs)
			}
		})
	})

	run(t, "callback writes are seen as they are when the walk reaches each key", func(t *testing.T) {
		walkWithWrites(t, open)
	})
}

// visit is what a walk reported of one snapshot.
type visit struct {
	Name   string
	Labels map[string]string
}

// Labels of the snapshots of walkWithWrites, telling which write each
// visited state comes from.
var (
	fixtureState   = map[string]string{"state": "fixture"}
	updatedState   = map[string]string{"state": "updated"}
	createdState   = map[string]string{"state": "created"}
	committedState = map[string]string{"state": "committed"}
)

// walkFixture writes, in the transaction ctx carries, the snapshots
// walkWithWrites walks, all labelled state=fixture:
//
//	b-committed  committed, no parent
//	d-active     active,    parent b-committed
//	f-active     active,    no parent
//	h-view       view,      parent b-committed
func walkFixture(t *testing.T, ctx context.Context) {
	t.Helper()
	with := snapshots.WithLabels(maps.Clone(fixtureState))
	mustLayer(t, ctx, "b-committed", "", snapshots.Usage{}, with)
	mustCreate(t, ctx, snapshots.KindActive, "d-active", "b-committed", with)
	mustCreate(t, ctx, snapshots.KindActive, "f-active", "", with)
	mustCreate(t, ctx, snapshots.KindView, "h-view", "b-committed", with)
}

// walkWithWrites: a WalkInfo callback may write in the walking transaction,
// and the walk reports each snapshot as the transaction holds it when the
// walk reaches its name: a snapshot removed or renamed before it is reached
// is not visited, one created ahead of the walk is, one created behind it is
// not, and one updated before it is reached shows its new labels. Each case
// runs on a fixture committed before the walk and on one written in the
// walking transaction itself.
func walkWithWrites(t *testing.T, open Opener) {
	fixture := func(name string) visit { return visit{name, fixtureState} }
	update := func(name string) func(*testing.T, context.Context) {
		return func(t *testing.T, ctx context.Context) {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: maps.Clone(updatedState)}, "labels.state")
			require.NoError(t, err, "update %q", name)
		}
	}
	create := func(names ...string) func(*testing.T, context.Context) {
		return func(t *testing.T, ctx context.Context) {
			for _, name := range names {
				mustCreate(t, ctx, snapshots.KindActive, name, "b-committed", snapshots.WithLabels(maps.Clone(createdState)))
			}
		}
	}
	remove := func(names ...string) func(*testing.T, context.Context) {
		return func(t *testing.T, ctx context.Context) {
			for _, name := range names {
				mustRemove(t, ctx, name)
			}
		}
	}
	commit := func(key, name string) func(*testing.T, context.Context) {
		return func(t *testing.T, ctx context.Context) {
			mustCommit(t, ctx, key, name, snapshots.Usage{}, snapshots.WithLabels(maps.Clone(committedState)))
		}
	}
	both := func(writes ...func(*testing.T, context.Context)) func(*testing.T, context.Context) {
		return func(t *testing.T, ctx context.Context) {
			for _, w := range writes {
				w(t, ctx)
			}
		}
	}

	cases := []struct {
		name  string
		at    string // the callback writes when the walk reaches this name, once
		write func(t *testing.T, ctx context.Context)
		want  []visit
	}{
		{
			"UpdateInfo of a later key shows its new labels", "d-active", update("f-active"),
			[]visit{fixture("b-committed"), fixture("d-active"), {"f-active", updatedState}, fixture("h-view")},
		},
		{
			"UpdateInfo of the last key shows its new labels", "b-committed", update("h-view"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), {"h-view", updatedState}},
		},
		{
			"UpdateInfo of an earlier key is not visited again", "d-active", update("b-committed"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"UpdateInfo of the current key is not visited again", "d-active", update("d-active"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"CreateSnapshot of a key after the cursor is visited", "d-active", create("e-new"),
			[]visit{fixture("b-committed"), fixture("d-active"), {"e-new", createdState}, fixture("f-active"), fixture("h-view")},
		},
		{
			"CreateSnapshot of keys after the cursor visits each", "b-committed", create("z-new", "c-new", "e-new"),
			[]visit{fixture("b-committed"), {"c-new", createdState}, fixture("d-active"), {"e-new", createdState}, fixture("f-active"), fixture("h-view"), {"z-new", createdState}},
		},
		{
			"CreateSnapshot of a key past the last one is visited", "h-view", create("z-new"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view"), {"z-new", createdState}},
		},
		{
			"CreateSnapshot of a key before the cursor is not visited", "d-active", create("c-new"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"CreateSnapshot then UpdateInfo after the cursor shows the update", "d-active", both(create("e-new"), update("e-new")),
			[]visit{fixture("b-committed"), fixture("d-active"), {"e-new", updatedState}, fixture("f-active"), fixture("h-view")},
		},
		{
			"CreateSnapshot then Remove after the cursor is not visited", "d-active", both(create("e-new"), remove("e-new")),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"Remove of a later key is not visited", "d-active", remove("f-active"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("h-view")},
		},
		{
			"Remove of every later key ends the walk", "b-committed", remove("d-active", "f-active", "h-view"),
			[]visit{fixture("b-committed")},
		},
		{
			"Remove of the current key goes on with the next", "d-active", remove("d-active"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"Remove of an earlier key goes on with the next", "f-active", remove("d-active"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("f-active"), fixture("h-view")},
		},
		{
			"CommitActive of a later key to a name after the cursor visits the new name only", "d-active", commit("f-active", "g-committed"),
			[]visit{fixture("b-committed"), fixture("d-active"), {"g-committed", committedState}, fixture("h-view")},
		},
		{
			"CommitActive of a later key to a name before the cursor visits neither", "d-active", commit("f-active", "a-committed"),
			[]visit{fixture("b-committed"), fixture("d-active"), fixture("h-view")},
		},
		{
			"CommitActive of the current key to a name after the cursor visits the new name", "d-active", commit("d-active", "e-committed"),
			[]visit{fixture("b-committed"), fixture("d-active"), {"e-committed", committedState}, fixture("f-active"), fixture("h-view")},
		},
	}
	fixtures := []struct {
		name string
		// walkTx writes the fixture and returns the walking transaction.
		walkTx func(t *testing.T, ms storage.MetaStore) (context.Context, storage.Transactor)
	}{
		{"fixture committed before the walk", func(t *testing.T, ms storage.MetaStore) (context.Context, storage.Transactor) {
			inWrite(t, ms, func(ctx context.Context) { walkFixture(t, ctx) })
			return begin(t, ms, true)
		}},
		{"fixture written in the walking transaction", func(t *testing.T, ms storage.MetaStore) (context.Context, storage.Transactor) {
			ctx, tx := begin(t, ms, true)
			walkFixture(t, ctx)
			return ctx, tx
		}},
	}
	// A walk that visits more than this does not end.
	const maxVisits = 20
	errRunaway := errors.New("the walk does not end")

	for _, tc := range cases {
		run(t, tc.name, func(t *testing.T) {
			for _, fx := range fixtures {
				run(t, fx.name, func(t *testing.T) {
					ms, _ := openStore(t, open)
					ctx, tx := fx.walkTx(t, ms)
					var got []visit
					wrote := false
					err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
						got = append(got, visit{info.Name, normLabels(info.Labels)})
						if len(got) > maxVisits {
							return errRunaway
						}
						if info.Name == tc.at && !wrote {
							wrote = true
							tc.write(t, ctx)
						}
						return nil
					})
					require.NoError(t, err, "walk")
					require.True(t, wrote, "the walk never reached %q", tc.at)
					assert.Equal(t, tc.want, got, "snapshots visited, in order, with their labels")
					require.NoError(t, tx.Commit(), "commit of the walking transaction")
				})
			}
		})
	}
}

// testGetSnapshot: GetSnapshot returns kind, ID and parent chain of active
// and view snapshots only.
func testGetSnapshot(t *testing.T, open Opener) {
	run(t, "active and view return kind, ID and ParentIDs immediate parent first", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			for _, name := range []string{"active-1", "active-2", "active-3", "view-1", "view-2"} {
				run(t, name, func(t *testing.T) {
					s, err := storage.GetSnapshot(ctx, name)
					require.NoError(t, err)
					spec := f.specs[name]
					assert.Equal(t, spec.kind, s.Kind, "kind")
					assert.Equal(t, f.ids[name], s.ID, "ID")
					assert.Equal(t, f.chain(spec.parent), normIDs(s.ParentIDs), "ParentIDs")
					assert.Equal(t, normIDs(f.snaps[name].ParentIDs), normIDs(s.ParentIDs), "ParentIDs as CreateSnapshot returned them")
				})
			}
		})
	})

	run(t, "committed is FailedPrecondition", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			for _, name := range []string{"committed-1", "committed-2"} {
				_, err := storage.GetSnapshot(ctx, name)
				assertClass(t, err, failedPrecondition, "GetSnapshot(%q)", name)
			}
		})
	})

	run(t, "missing is NotFound", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		inRead(t, ms, func(ctx context.Context) {
			_, err := storage.GetSnapshot(ctx, "does-not-exist")
			assertClass(t, err, notFound)
		})
	})

	run(t, "empty store is NotFound", func(t *testing.T) {
		ms, _ := openStore(t, open)
		inRead(t, ms, func(ctx context.Context) {
			_, err := storage.GetSnapshot(ctx, "active-1")
			assertClass(t, err, notFound)
		})
	})
}

// sorted returns a sorted copy of names.
func sorted(names []string) []string {
	out := slices.Clone(names)
	slices.Sort(out)
	return out
}
