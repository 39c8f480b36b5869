package storage_test

// Every name a listing returns can be reached:
//
//   - TestContainerdLongNamesAreReachable: names containerd's store accepts
//     (up to bbolt's key limit) are read, updated, used and removed here;
//   - TestEtcdLookupsOfHugeNamesSendNoRequest: a name no record can have is
//     absent without a request, one that may exist is looked up;
//   - TestEtcdRecordUnderTheEmptyNameIsCorrupt and
//     TestEtcdListedNamesAreReachable: a record no lookup reaches is a
//     corrupt record, not a listed snapshot.

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	cstorage "github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// nameOf returns a name of n bytes starting with prefix.
func nameOf(prefix string, n int) string {
	return prefix + strings.Repeat("x", n-len(prefix))
}

func TestContainerdLongNamesAreReachable(t *testing.T) {
	dbfile := filepath.Join(t.TempDir(), "metadata.db")
	// Longer than MaxNameSize, well within bbolt's key limit, and accepted
	// by containerd's store.
	layer := nameOf("layer-", 5000)
	doomed := nameOf("doomed-", 5000)
	work := nameOf("work-", 5000)
	require.Greater(t, len(layer), storage.MaxNameSize)
	ids, _ := ctrdApply(t, ctrdTheirs, dbfile, []ctrdStep{
		{"long names", func(r *ctrdRun) error {
			if err := r.layer(layer, "", snapshots.Usage{Size: 1}, nil); err != nil {
				return err
			}
			if err := r.create(snapshots.KindActive, doomed, layer, nil); err != nil {
				return err
			}
			return r.create(snapshots.KindActive, work, layer, map[string]string{"a": "b"})
		}},
	})

	ms, err := storage.NewBoltMetaStore(dbfile)
	require.NoError(t, err)
	defer func() { require.NoError(t, ms.Close()) }()

	// Each step is one transaction, in order: the last ones remove what the
	// first ones read.
	steps := []struct {
		name     string
		writable bool
		do       func(t *testing.T, ctx context.Context) error
	}{
		{"WalkInfo lists them", false, func(t *testing.T, ctx context.Context) error {
			var names []string
			err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
				names = append(names, info.Name)
				return nil
			})
			assert.Subset(t, names, []string{layer, doomed, work})
			return err
		}},
		{"GetInfo of the committed layer", false, func(t *testing.T, ctx context.Context) error {
			id, info, usage, err := storage.GetInfo(ctx, layer)
			assert.Equal(t, ids[layer], id)
			assert.Equal(t, snapshots.KindCommitted, info.Kind)
			assert.Equal(t, int64(1), usage.Size)
			return err
		}},
		{"GetInfo of an active", false, func(t *testing.T, ctx context.Context) error {
			id, info, _, err := storage.GetInfo(ctx, work)
			assert.Equal(t, ids[work], id)
			assert.Equal(t, layer, info.Parent)
			return err
		}},
		{"GetSnapshot", false, func(t *testing.T, ctx context.Context) error {
			s, err := storage.GetSnapshot(ctx, work)
			assert.Equal(t, storage.Snapshot{Kind: snapshots.KindActive, ID: ids[work], ParentIDs: []string{ids[layer]}}, s)
			return err
		}},
		{"UpdateInfo", true, func(t *testing.T, ctx context.Context) error {
			info, err := storage.UpdateInfo(ctx, snapshots.Info{Name: work, Labels: map[string]string{"c": "d"}}, "labels.c")
			assert.Equal(t, map[string]string{"a": "b", "c": "d"}, info.Labels)
			return err
		}},
		{"a child of the long layer", true, func(t *testing.T, ctx context.Context) error {
			s, err := storage.CreateSnapshot(ctx, snapshots.KindView, "child", layer)
			assert.Equal(t, []string{ids[layer]}, s.ParentIDs)
			return err
		}},
		{"Remove of an active", true, func(t *testing.T, ctx context.Context) error {
			id, kind, err := storage.Remove(ctx, doomed)
			assert.Equal(t, ids[doomed], id)
			assert.Equal(t, snapshots.KindActive, kind)
			return err
		}},
		{"CommitActive of an active", true, func(t *testing.T, ctx context.Context) error {
			id, err := storage.CommitActive(ctx, work, "committed", snapshots.Usage{})
			assert.Equal(t, ids[work], id)
			return err
		}},
		{"the layer keeps its children", true, func(t *testing.T, ctx context.Context) error {
			_, _, err := storage.Remove(ctx, layer)
			assert.True(t, errdefs.IsFailedPrecondition(err), "got %v", err)
			return nil
		}},
		{"Remove of the children and the layer", true, func(t *testing.T, ctx context.Context) error {
			for _, name := range []string{"child", "committed", layer} {
				if _, _, err := storage.Remove(ctx, name); err != nil {
					return err
				}
			}
			return nil
		}},
	}
	for _, st := range steps {
		err := ms.WithTransaction(context.Background(), st.writable, func(ctx context.Context) error {
			return st.do(t, ctx)
		})
		assert.NoError(t, err, "%s", st.name)
	}

	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Empty(t, problems)
	require.NoError(t, ms.Close())

	// containerd agrees that everything is gone.
	cms, err := cstorage.NewMetaStore(dbfile)
	require.NoError(t, err)
	defer cms.Close()
	require.NoError(t, cms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		m, err := cstorage.IDMap(ctx)
		assert.Empty(t, m)
		return err
	}))
}

func TestEtcdLookupsOfHugeNamesSendNoRequest(t *testing.T) {
	var requests atomic.Int64
	ms := openEtcd(t, uniqueRoot(t), storage.WithoutWatchCache(), storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV {
		return countingKV{KV: kv, n: &requests}
	}))
	warmUp(t, ms)
	huge := nameOf("huge-", 2<<20) // over etcd's request limit
	for _, c := range []struct {
		name     string
		key      string
		requests int64
	}{
		{"a name of MaxNameSize is looked up", nameOf("k-", storage.MaxNameSize), 1},
		{"a longer name is looked up too", nameOf("k-", 5000), 1},
		{"a name over the request limit is absent without a request", huge, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			requests.Store(0)
			err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				_, _, _, err := storage.GetInfo(ctx, c.key)
				return err
			})
			assert.True(t, errdefs.IsNotFound(err), "got %v", err)
			assert.Equal(t, c.requests, requests.Load(), "requests sent")
		})
	}
}

func TestEtcdRecordUnderTheEmptyNameIsCorrupt(t *testing.T) {
	root := uniqueRoot(t)
	ms := openEtcd(t, root)
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	raw := &chkEtcdRaw{t: t, cli: etcdServer(t).Client(t), prefix: root + "/" + storage.KeyEtcdVersion + "/"}
	rec := raw.record("base")
	rec.ID = raw.idLimit() // an ID of its own
	raw.setRecord("", rec)

	for _, c := range []struct {
		name string
		op   func(ctx context.Context) error
		want string
	}{
		{"WalkInfo", func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
				assert.NotEmpty(t, info.Name, "WalkInfo listed the empty name")
				return nil
			})
		}, "DataLoss"},
		{"IDMap", func(ctx context.Context) error {
			m, err := storage.IDMap(ctx)
			assert.NotContains(t, m, "", "IDMap listed the empty name")
			return err
		}, "DataLoss"},
		{"GetInfo of the empty name", func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, "")
			return err
		}, "NotFound"},
		{"GetInfo of another name", func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, "base")
			return err
		}, "ok"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := ms.WithTransaction(context.Background(), false, c.op)
			assert.Equal(t, c.want, className(err), "got %v", err)
			if c.want == "DataLoss" {
				assert.ErrorIs(t, err, storage.ErrCorrupt)
			}
		})
	}

	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	chkAssertProblems(t, problems, []chkWant{{"", "name must not be empty"}})
}

// TestEtcdListedNamesAreReachable writes records by hand under names this
// package never gives (it refuses new names over MaxNameSize): up to the
// documented bound of etcd lookups (64 KiB) they are read and removed, even
// when escaping triples them in the children index; beyond it, a listing
// ends with ErrCorrupt and Check reports the record.
func TestEtcdListedNamesAreReachable(t *testing.T) {
	const bound = 64 << 10
	for _, c := range []struct {
		name string
		// parent (committed; "" for none) and child (active on it) are
		// written by hand.
		parent, child string
		reachable     bool
	}{
		{"a name of 5000 bytes", "", nameOf("long-", 5000), true},
		{"names at the bound that escape to three times that", strings.Repeat("/", bound), strings.Repeat("%", bound), true},
		{"a name over the bound", "", nameOf("huge-", bound+1), false},
		{"a name of 1 MiB", "", nameOf("huge-", 1<<20), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			root := uniqueRoot(t)
			ms := openEtcd(t, root)
			update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
			raw := &chkEtcdRaw{t: t, cli: etcdServer(t).Client(t), prefix: root + "/" + storage.KeyEtcdVersion + "/"}
			tail := raw.record("base").tail
			child := chkRecord{ID: 100, Kind: snapshots.KindActive, tail: tail}
			if c.parent != "" {
				raw.setRecord(c.parent, chkRecord{ID: 101, Kind: snapshots.KindCommitted, tail: tail})
				child.Parent, child.Chain = c.parent, []uint64{101}
				raw.putLink(c.parent, 101, 100, c.child)
			}
			raw.setRecord(c.child, child)

			var listed []string
			walkErr := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
					listed = append(listed, info.Name)
					return nil
				})
			})
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			if !c.reachable {
				assert.Equal(t, "DataLoss", className(walkErr), "WalkInfo: got %v", walkErr)
				assert.ErrorIs(t, walkErr, storage.ErrCorrupt)
				assert.False(t, slices.Contains(listed, c.child), "WalkInfo listed the name of %d bytes, which no lookup reaches", len(c.child))
				chkAssertProblems(t, problems, []chkWant{{c.child, "longer than"}})
				return
			}
			assert.NoError(t, walkErr)
			assert.True(t, slices.Contains(listed, c.child), "WalkInfo did not list the name of %d bytes", len(c.child))
			assert.Empty(t, problems)
			require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				s, err := storage.GetSnapshot(ctx, c.child)
				assert.Equal(t, storage.Snapshot{Kind: snapshots.KindActive, ID: "100", ParentIDs: formatChain(child.Chain)}, s)
				return err
			}))
			for _, name := range []string{c.child, c.parent} {
				if name == "" {
					continue
				}
				err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
					_, _, err := storage.Remove(ctx, name)
					return err
				})
				assert.NoError(t, err, "Remove of the name of %d bytes", len(name))
			}
			problems, err = storage.Check(context.Background(), ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}

func formatChain(ids []uint64) []string {
	var out []string
	for _, id := range ids {
		out = append(out, chkID(id))
	}
	return out
}
