package storage_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// engines opens a fresh store of each engine for table-driven tests.
var engines = []struct {
	name string
	open func(t *testing.T) storage.MetaStore
}{
	{"bolt", func(t *testing.T) storage.MetaStore { return openBolt(t, t.TempDir()) }},
	{"etcd", func(t *testing.T) storage.MetaStore { return openEtcd(t, uniqueRoot(t)) }},
}

func TestImportKeepsIDsAndRaisesTheAllocator(t *testing.T) {
	when := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	recs := []storage.Record{
		{Name: "base", ID: "10", Kind: snapshots.KindCommitted, Created: when, Updated: when, Usage: snapshots.Usage{Size: 7, Inodes: 2}},
		{Name: "layer", ID: "300", Kind: snapshots.KindCommitted, Parent: "base", Labels: map[string]string{"a": "b"}, Created: when, Updated: when},
		{Name: "container", ID: "20", Kind: snapshots.KindActive, Parent: "layer", Created: when, Updated: when},
	}
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			ctx := context.Background()
			update(t, ms, func(ctx context.Context) error { return storage.Import(ctx, recs...) })

			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				id, info, usage, err := storage.GetInfo(ctx, "base")
				require.NoError(t, err)
				assert.Equal(t, "10", id)
				assert.True(t, info.Created.Equal(when))
				assert.Equal(t, snapshots.Usage{Size: 7, Inodes: 2}, usage)
				s, err := storage.GetSnapshot(ctx, "container")
				require.NoError(t, err)
				assert.Equal(t, storage.Snapshot{Kind: snapshots.KindActive, ID: "20", ParentIDs: []string{"300", "10"}}, s)
				return nil
			}))
			var fresh storage.Snapshot
			update(t, ms, func(ctx context.Context) (err error) {
				fresh, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "layer")
				return err
			})
			n, err := strconv.ParseUint(fresh.ID, 10, 64)
			require.NoError(t, err)
			assert.Greater(t, n, uint64(300), "new IDs are above every imported one")

			problems, err := storage.Check(ctx, ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}

func TestImportRefusesBadRecordsAndChangesNothing(t *testing.T) {
	good := storage.Record{Name: "base", ID: "5", Kind: snapshots.KindCommitted}
	for _, tc := range []struct {
		name  string
		rec   storage.Record
		class func(error) bool
	}{
		{"existing name", storage.Record{Name: "base", ID: "6", Kind: snapshots.KindCommitted}, errdefs.IsAlreadyExists},
		{"missing parent", storage.Record{Name: "x", ID: "6", Kind: snapshots.KindActive, Parent: "nope"}, errdefs.IsNotFound},
		{"active parent", storage.Record{Name: "y", ID: "7", Kind: snapshots.KindActive, Parent: "active"}, errdefs.IsInvalidArgument},
		{"bad ID", storage.Record{Name: "x", ID: "x1", Kind: snapshots.KindActive}, errdefs.IsInvalidArgument},
		{"zero ID", storage.Record{Name: "x", ID: "0", Kind: snapshots.KindActive}, errdefs.IsInvalidArgument},
		{"unknown kind", storage.Record{Name: "x", ID: "8", Kind: 42}, errdefs.IsInvalidArgument},
		{"empty name", storage.Record{ID: "8", Kind: snapshots.KindActive}, errdefs.IsInvalidArgument},
	} {
		for _, eng := range engines {
			t.Run(tc.name+"/"+eng.name, func(t *testing.T) {
				ms := eng.open(t)
				update(t, ms, func(ctx context.Context) error {
					return storage.Import(ctx, good, storage.Record{Name: "active", ID: "6", Kind: snapshots.KindActive})
				})
				err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
					return storage.Import(ctx, storage.Record{Name: "ok", ID: "100", Kind: snapshots.KindCommitted}, tc.rec)
				})
				assert.True(t, tc.class(err), "got %v", err)
				require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
					ids, err := storage.IDMap(ctx)
					assert.Equal(t, map[string]string{"5": "base", "6": "active"}, ids)
					return err
				}))
			})
		}
	}
}

func TestIDLimitCarriedByRaiseIDsKeepsRemovedIDsRetired(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			src, dst := eng.open(t), eng.open(t)
			var removed string
			update(t, src, func(ctx context.Context) error {
				for _, name := range []string{"a", "b", "c"} {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, ""); err != nil {
						return err
					}
				}
				var err error
				removed, _, err = storage.Remove(ctx, "c")
				return err
			})
			var limit uint64
			require.NoError(t, src.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
				limit, err = storage.IDLimit(ctx)
				return err
			}))
			gone, err := strconv.ParseUint(removed, 10, 64)
			require.NoError(t, err)
			assert.GreaterOrEqual(t, limit, gone, "the limit covers the removed ID")

			update(t, dst, func(ctx context.Context) error { return storage.RaiseIDs(ctx, limit) })
			var s storage.Snapshot
			update(t, dst, func(ctx context.Context) (err error) {
				s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "")
				return err
			})
			id, err := strconv.ParseUint(s.ID, 10, 64)
			require.NoError(t, err)
			assert.Greater(t, id, limit)
		})
	}
}
