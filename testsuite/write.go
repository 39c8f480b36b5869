package testsuite

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// without returns st with the named snapshots removed, to compare a store
// with what it was before snapshots were added.
func without(st storeState, names ...string) storeState {
	out := storeState{Snapshots: maps.Clone(st.Snapshots), IDMap: maps.Clone(st.IDMap)}
	for _, name := range names {
		if s, ok := out.Snapshots[name]; ok {
			delete(out.IDMap, s.ID)
		}
		delete(out.Snapshots, name)
	}
	return out
}

// testCreateSnapshot: CreateSnapshot adds active and view snapshots on a
// committed parent or none, and refuses everything else without a trace.
func testCreateSnapshot(t *testing.T, open Opener) {
	run(t, "creates", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		cases := []struct {
			name   string
			kind   snapshots.Kind
			key    string
			parent string
			labels map[string]string
		}{
			{"active without parent", snapshots.KindActive, "new-active", "", nil},
			{"view without parent", snapshots.KindView, "new-view", "", nil},
			{"active on a committed parent", snapshots.KindActive, "new-active-child", "committed-1", nil},
			{"view on a committed parent two deep", snapshots.KindView, "new-view-child", "committed-2", nil},
			{"active with labels", snapshots.KindActive, "new-active-labelled", "committed-2", map[string]string{"a": "1", "b": "2"}},
			{"view with labels", snapshots.KindView, "new-view-labelled", "", map[string]string{"containerd.io/snapshot/x": "y"}},
		}
		for _, tc := range cases {
			run(t, tc.name, func(t *testing.T) {
				before := dump(t, ms)
				var opts []snapshots.Opt
				if tc.labels != nil {
					opts = append(opts, snapshots.WithLabels(maps.Clone(tc.labels)))
				}
				start := time.Now()
				ctx, tx := begin(t, ms, true)
				s := mustCreate(t, ctx, tc.kind, tc.key, tc.parent, opts...)
				assert.Equal(t, tc.kind, s.Kind, "kind")
				assert.NotContains(t, before.IDMap, s.ID, "new ID %s already in use", s.ID)
				assert.Equal(t, f.chain(tc.parent), normIDs(s.ParentIDs), "ParentIDs")

				check := func(ctx context.Context, end time.Time) {
					got, err := storage.GetSnapshot(ctx, tc.key)
					if assert.NoError(t, err) {
						assert.Equal(t, s.Kind, got.Kind)
						assert.Equal(t, s.ID, got.ID)
						assert.Equal(t, normIDs(s.ParentIDs), normIDs(got.ParentIDs))
					}
					id, info, usage := mustGetInfo(t, ctx, tc.key)
					assert.Equal(t, s.ID, id, "GetInfo ID")
					assert.Equal(t, tc.kind, info.Kind)
					assert.Equal(t, tc.key, info.Name)
					assert.Equal(t, tc.parent, info.Parent)
					assert.Equal(t, normLabels(tc.labels), normLabels(info.Labels), "labels from WithLabels")
					assert.Zero(t, usage, "a new snapshot has no usage")
					assertStamps(t, info, start, end)
				}
				check(ctx, time.Now())
				require.NoError(t, tx.Commit())
				end := time.Now()
				inRead(t, ms, func(ctx context.Context) { check(ctx, end) })

				after := dump(t, ms)
				assert.Equal(t, tc.key, after.IDMap[s.ID], "IDMap of the new ID")
				assert.Equal(t, before, without(after, tc.key), "creating %q changed other snapshots", tc.key)
			})
		}
	})

	run(t, "refuses", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		cases := []struct {
			name   string
			kind   snapshots.Kind
			key    string
			parent string
			class  errClass
		}{
			{"missing parent is NotFound", snapshots.KindActive, "new", "does-not-exist", notFound},
			{"view on a missing parent is NotFound", snapshots.KindView, "new", "does-not-exist", notFound},
			{"active parent is InvalidArgument", snapshots.KindActive, "new", "active-1", invalidArgument},
			{"view on an active parent is InvalidArgument", snapshots.KindView, "new", "active-2", invalidArgument},
			{"view parent is InvalidArgument", snapshots.KindActive, "new", "view-1", invalidArgument},
			{"duplicate active key is AlreadyExists", snapshots.KindActive, "active-1", "", alreadyExists},
			{"duplicate key with parent is AlreadyExists", snapshots.KindActive, "active-2", "committed-1", alreadyExists},
			{"view over a committed name is AlreadyExists", snapshots.KindView, "committed-1", "", alreadyExists},
			{"active over a view name is AlreadyExists", snapshots.KindActive, "view-2", "committed-2", alreadyExists},
			{"kind committed is InvalidArgument", snapshots.KindCommitted, "new", "", invalidArgument},
			{"kind committed with parent is InvalidArgument", snapshots.KindCommitted, "new", "committed-1", invalidArgument},
			{"kind unknown is InvalidArgument", snapshots.KindUnknown, "new", "", invalidArgument},
			{"out of range kind is InvalidArgument", snapshots.Kind(42), "new", "", invalidArgument},
			{"empty key is InvalidArgument", snapshots.KindActive, "", "", invalidArgument},
		}
		for _, tc := range cases {
			run(t, tc.name, func(t *testing.T) {
				refusal(t, ms, tc.class, func(ctx context.Context) error {
					_, err := storage.CreateSnapshot(ctx, tc.kind, tc.key, tc.parent, snapshots.WithLabels(map[string]string{"refused": "yes"}))
					return err
				})
			})
		}
	})
}

// testCommitActive: CommitActive turns an active into a committed snapshot
// under a new name, keeping its ID and parent, storing usage and replacing
// labels; it refuses anything but a free name and an existing active.
func testCommitActive(t *testing.T, open Opener) {
	cases := []struct {
		name       string
		parent     string
		labels     map[string]string
		wantLabels map[string]string
	}{
		{"labels from the commit replace the active's", "committed-2", map[string]string{"new": "2"}, map[string]string{"new": "2"}},
		{"labels are not inherited without WithLabels", "committed-1", nil, nil},
		{"active without parent", "", map[string]string{"k": "v"}, map[string]string{"k": "v"}},
	}
	for _, tc := range cases {
		run(t, "commits: "+tc.name, func(t *testing.T) {
			ms, _ := openStore(t, open)
			f := populate(t, ms)
			usage := snapshots.Usage{Size: 4096, Inodes: 7}

			var active storage.Snapshot
			inWrite(t, ms, func(ctx context.Context) {
				active = mustCreate(t, ctx, snapshots.KindActive, "to-commit", tc.parent,
					snapshots.WithLabels(map[string]string{"old": "1", "new": "old-value"}))
			})
			before := dump(t, ms)

			start := time.Now()
			ctx, tx := begin(t, ms, true)
			var opts []snapshots.Opt
			if tc.labels != nil {
				opts = append(opts, snapshots.WithLabels(maps.Clone(tc.labels)))
			}
			id := mustCommit(t, ctx, "to-commit", "committed-new", usage, opts...)
			assert.Equal(t, active.ID, id, "commit must keep the active's ID")

			check := func(ctx context.Context, end time.Time) {
				gotID, info, gotUsage := mustGetInfo(t, ctx, "committed-new")
				assert.Equal(t, id, gotID, "ID")
				assert.Equal(t, snapshots.KindCommitted, info.Kind, "kind")
				assert.Equal(t, "committed-new", info.Name)
				assert.Equal(t, tc.parent, info.Parent, "parent is kept")
				assert.Equal(t, normLabels(tc.wantLabels), normLabels(info.Labels), "labels")
				assert.Equal(t, usage, gotUsage, "usage")
				assertStamps(t, info, start, end)

				_, _, _, err := storage.GetInfo(ctx, "to-commit")
				assertClass(t, err, notFound, "the active key is gone")
				_, err = storage.GetSnapshot(ctx, "to-commit")
				assertClass(t, err, notFound, "the active key is gone")
				_, err = storage.GetSnapshot(ctx, "committed-new")
				assertClass(t, err, failedPrecondition, "GetSnapshot of the committed result")

				ids, err := storage.IDMap(ctx)
				if assert.NoError(t, err) {
					assert.Equal(t, "committed-new", ids[id], "IDMap maps the ID to the new name")
				}
			}
			check(ctx, time.Now())
			require.NoError(t, tx.Commit())
			end := time.Now()
			inRead(t, ms, func(ctx context.Context) { check(ctx, end) })

			after := dump(t, ms)
			assert.Equal(t, without(before, "to-commit"), without(after, "committed-new"), "commit changed other snapshots")

			// The committed snapshot is a parent like any other, and its own
			// parent still counts it as a child.
			inWrite(t, ms, func(ctx context.Context) {
				v := mustCreate(t, ctx, snapshots.KindView, "view-of-new", "committed-new")
				assert.Equal(t, append([]string{id}, f.chain(tc.parent)...), v.ParentIDs)
				if tc.parent != "" {
					_, _, err := storage.Remove(ctx, tc.parent)
					assertClass(t, err, failedPrecondition, "parent of a committed snapshot must keep it as a child")
				}
			})
		})
	}

	run(t, "refuses", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		cases := []struct {
			name  string
			key   string
			cname string
			class errClass
		}{
			{"missing key is NotFound", "does-not-exist", "committed-new", notFound},
			{"name of a committed snapshot is AlreadyExists", "active-1", "committed-1", alreadyExists},
			{"name of an active snapshot is AlreadyExists", "active-1", "active-2", alreadyExists},
			{"name of a view is AlreadyExists", "active-3", "view-1", alreadyExists},
			{"own name is AlreadyExists", "active-1", "active-1", alreadyExists},
			{"committed key is FailedPrecondition", "committed-2", "committed-new", failedPrecondition},
			{"view key is FailedPrecondition", "view-1", "committed-new", failedPrecondition},
			{"view key with parent is FailedPrecondition", "view-2", "committed-new", failedPrecondition},
			{"empty name is InvalidArgument", "active-1", "", invalidArgument},
		}
		for _, tc := range cases {
			run(t, tc.name, func(t *testing.T) {
				refusal(t, ms, tc.class, func(ctx context.Context) error {
					_, err := storage.CommitActive(ctx, tc.key, tc.cname, snapshots.Usage{Size: 99, Inodes: 9},
						snapshots.WithLabels(map[string]string{"refused": "yes"}))
					return err
				})
			})
		}
	})
}

// testRemove: Remove deletes a snapshot without children, returning its ID
// and kind, and refuses missing snapshots and parents.
func testRemove(t *testing.T, open Opener) {
	run(t, "removes", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inWrite(t, ms, func(ctx context.Context) {
			f.ids["lonely"] = mustLayer(t, ctx, "lonely", "committed-2", snapshots.Usage{Size: 3})
		})
		cases := []struct {
			name string
			key  string
			kind snapshots.Kind
		}{
			{"active with parent", "active-2", snapshots.KindActive},
			{"active without parent", "active-1", snapshots.KindActive},
			{"view", "view-2", snapshots.KindView},
			{"committed without children", "lonely", snapshots.KindCommitted},
		}
		for _, tc := range cases {
			run(t, tc.name, func(t *testing.T) {
				before := dump(t, ms)
				ctx, tx := begin(t, ms, true)
				id, kind := mustRemove(t, ctx, tc.key)
				assert.Equal(t, f.ids[tc.key], id, "removed ID")
				assert.Equal(t, tc.kind, kind, "removed kind")
				check := func(ctx context.Context) {
					_, _, _, err := storage.GetInfo(ctx, tc.key)
					assertClass(t, err, notFound, "GetInfo after Remove")
					ids, err := storage.IDMap(ctx)
					if assert.NoError(t, err) {
						assert.NotContains(t, ids, id, "IDMap after Remove")
					}
				}
				check(ctx)
				require.NoError(t, tx.Commit())
				inRead(t, ms, check)
				assert.Equal(t, without(before, tc.key), dump(t, ms), "Remove changed other snapshots")
			})
		}
	})

	run(t, "missing key is NotFound", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		refusal(t, ms, notFound, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "does-not-exist")
			return err
		})
	})

	run(t, "snapshot with children is FailedPrecondition", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		for _, key := range []string{"committed-1", "committed-2"} {
			refusal(t, ms, failedPrecondition, func(ctx context.Context) error {
				_, _, err := storage.Remove(ctx, key)
				return err
			})
		}
	})

	run(t, "removing the children frees the parent", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		inWrite(t, ms, func(ctx context.Context) {
			remove := func(key string) {
				id, _ := mustRemove(t, ctx, key)
				assert.Equal(t, f.ids[key], id, "removed ID of %q", key)
			}
			busy := func(key string) {
				_, _, err := storage.Remove(ctx, key)
				assertClass(t, err, failedPrecondition, "%q still has children", key)
			}
			remove("active-3")
			busy("committed-2") // view-2 is left
			remove("view-2")
			remove("active-2")
			busy("committed-1") // committed-2 is a (committed) child
			remove("committed-2")
			remove("committed-1")
		})
		st := dump(t, ms)
		assert.Equal(t, []string{"active-1", "view-1"}, sorted(keys(st.Snapshots)))
	})
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// testUpdateInfo: UpdateInfo changes labels by field path exactly as
// containerd does, moves Updated forward and nothing else.
func testUpdateInfo(t *testing.T, open Opener) {
	type tc struct {
		name       string
		kind       snapshots.Kind // of the snapshot updated
		labels     map[string]string
		paths      []string
		wantLabels map[string]string
	}
	start := map[string]string{"a": "1", "b": "2"}
	cases := []tc{
		{"no field path replaces all labels", snapshots.KindCommitted, map[string]string{"c": "3"}, nil, map[string]string{"c": "3"}},
		{"no field path with no labels clears them", snapshots.KindCommitted, nil, nil, nil},
		{"labels replaces all labels", snapshots.KindCommitted, map[string]string{"c": "3", "a": "9"}, []string{"labels"}, map[string]string{"a": "9", "c": "3"}},
		{"labels with none clears them", snapshots.KindActive, nil, []string{"labels"}, nil},
		{"labels.k sets one label and ignores the others given", snapshots.KindCommitted, map[string]string{"a": "x", "c": "3"}, []string{"labels.a"}, map[string]string{"a": "x", "b": "2"}},
		{"labels.k adds a label", snapshots.KindView, map[string]string{"c": "3"}, []string{"labels.c"}, map[string]string{"a": "1", "b": "2", "c": "3"}},
		{"labels.k with an empty value removes it", snapshots.KindCommitted, map[string]string{"a": ""}, []string{"labels.a"}, map[string]string{"b": "2"}},
		{"labels.k with a missing value removes it", snapshots.KindActive, map[string]string{"c": "3"}, []string{"labels.b"}, map[string]string{"a": "1"}},
		{"labels.k of a dotted key", snapshots.KindCommitted, map[string]string{"x.y/z": "w"}, []string{"labels.x.y/z"}, map[string]string{"a": "1", "b": "2", "x.y/z": "w"}},
		{"several labels.k paths apply in order", snapshots.KindCommitted, map[string]string{"a": "", "b": "5", "d": "4"}, []string{"labels.a", "labels.b", "labels.d"}, map[string]string{"b": "5", "d": "4"}},
		{"labels then labels.k", snapshots.KindCommitted, map[string]string{"c": "3"}, []string{"labels", "labels.a"}, map[string]string{"c": "3"}},
	}

	ms, _ := openStore(t, open)
	populate(t, ms)
	usage := snapshots.Usage{Size: 5, Inodes: 6}
	// subject creates a fresh snapshot of kind, labelled a=1 b=2, on
	// committed-1.
	subject := func(t *testing.T, name string, kind snapshots.Kind) {
		t.Helper()
		inWrite(t, ms, func(ctx context.Context) {
			opt := snapshots.WithLabels(maps.Clone(start))
			if kind == snapshots.KindCommitted {
				mustLayer(t, ctx, name, "committed-1", usage, opt)
				return
			}
			mustCreate(t, ctx, kind, name, "committed-1", opt)
		})
	}

	for i, c := range cases {
		run(t, c.name, func(t *testing.T) {
			name := "subject-" + string(rune('a'+i))
			subject(t, name, c.kind)
			_, orig, origUsage := mustGetInfoRead(t, ms, name)
			before := dump(t, ms)
			time.Sleep(2 * time.Millisecond) // let the clock move past orig.Updated

			ctx, tx := begin(t, ms, true)
			// Everything but the labels in the argument must be ignored.
			arg := snapshots.Info{
				Name:    name,
				Kind:    snapshots.KindView,
				Parent:  "committed-2",
				Labels:  maps.Clone(c.labels),
				Created: time.Unix(1, 0),
				Updated: time.Unix(2, 0),
			}
			if c.kind == snapshots.KindView {
				arg.Kind = snapshots.KindActive
			}
			got, err := storage.UpdateInfo(ctx, arg, c.paths...)
			require.NoError(t, err)
			assert.Equal(t, name, got.Name)
			assert.Equal(t, c.kind, got.Kind, "kind must not change")
			assert.Equal(t, "committed-1", got.Parent, "parent must not change")
			assert.Equal(t, normLabels(c.wantLabels), normLabels(got.Labels), "labels")
			assert.True(t, got.Created.Equal(orig.Created), "Created must not change: %v -> %v", orig.Created, got.Created)
			assert.True(t, got.Updated.After(orig.Updated), "Updated must advance: %v -> %v", orig.Updated, got.Updated)
			assert.Same(t, time.UTC, got.Updated.Location(), "Updated in UTC")

			fresh := func(ctx context.Context) {
				_, info, u := mustGetInfo(t, ctx, name)
				assert.Equal(t, got.Kind, info.Kind)
				assert.Equal(t, got.Parent, info.Parent)
				assert.Equal(t, normLabels(got.Labels), normLabels(info.Labels), "stored labels equal the returned ones")
				assert.True(t, got.Created.Equal(info.Created), "stored Created %v equals returned %v", info.Created, got.Created)
				assert.True(t, got.Updated.Equal(info.Updated), "stored Updated %v equals returned %v", info.Updated, got.Updated)
				assert.Same(t, time.UTC, info.Created.Location())
				assert.Same(t, time.UTC, info.Updated.Location())
				assert.Equal(t, origUsage, u, "usage must not change")
			}
			fresh(ctx)
			require.NoError(t, tx.Commit())
			inRead(t, ms, fresh)
			assert.Equal(t, without(before, name), without(dump(t, ms), name), "UpdateInfo changed other snapshots")
		})
	}

	refusals := []struct {
		name  string
		info  snapshots.Info
		paths []string
		class errClass
	}{
		{"field path name is InvalidArgument", snapshots.Info{Name: "committed-2", Labels: map[string]string{"a": "b"}}, []string{"name"}, invalidArgument},
		{"field path parent is InvalidArgument", snapshots.Info{Name: "active-3", Parent: "committed-1"}, []string{"parent"}, invalidArgument},
		{"field path kind is InvalidArgument", snapshots.Info{Name: "active-1", Kind: snapshots.KindCommitted}, []string{"kind"}, invalidArgument},
		{"a bad path after a good one changes nothing", snapshots.Info{Name: "committed-1", Labels: map[string]string{"foo": "changed"}}, []string{"labels.foo", "parent"}, invalidArgument},
		{"missing snapshot is NotFound", snapshots.Info{Name: "does-not-exist", Labels: map[string]string{"a": "b"}}, nil, notFound},
		{"missing snapshot with a path is NotFound", snapshots.Info{Name: "does-not-exist", Labels: map[string]string{"a": "b"}}, []string{"labels.a"}, notFound},
	}
	for _, r := range refusals {
		run(t, r.name, func(t *testing.T) {
			refusal(t, ms, r.class, func(ctx context.Context) error {
				_, err := storage.UpdateInfo(ctx, r.info, r.paths...)
				return err
			})
		})
	}
}

// mustGetInfoRead is mustGetInfo in a read-only transaction of its own.
func mustGetInfoRead(t *testing.T, ms storage.MetaStore, key string) (id string, info snapshots.Info, usage snapshots.Usage) {
	t.Helper()
	inRead(t, ms, func(ctx context.Context) { id, info, usage = mustGetInfo(t, ctx, key) })
	return id, info, usage
}
