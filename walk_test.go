package storage_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// walkAll returns the records Walk hands over, and its error.
func walkAll(t *testing.T, ms storage.MetaStore, filters ...string) ([]storage.Record, error) {
	t.Helper()
	var recs []storage.Record
	err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		recs = recs[:0]
		return storage.Walk(ctx, func(r storage.Record) error {
			recs = append(recs, r)
			return nil
		}, filters...)
	})
	return recs, err
}

// TestWalkHandsOverEveryField: Walk gives what GetInfo gives, in name
// order, on both engines, filters applied.
func TestWalkHandsOverEveryField(t *testing.T) {
	for name, ms := range map[string]storage.MetaStore{
		"bolt": openBolt(t, t.TempDir()),
		"etcd": openEtcd(t, uniqueRoot(t), storage.WithPageSize(2)),
	} {
		t.Run(name, func(t *testing.T) {
			update(t, ms, func(ctx context.Context) error {
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a-active", ""); err != nil {
					return err
				}
				if _, err := storage.CommitActive(ctx, "a-active", "a", snapshots.Usage{Size: 42, Inodes: 7},
					snapshots.WithLabels(map[string]string{"k": "v"})); err != nil {
					return err
				}
				_, err := storage.CreateSnapshot(ctx, snapshots.KindView, "b", "a")
				return err
			})
			recs, err := walkAll(t, ms)
			require.NoError(t, err)
			require.Len(t, recs, 2)
			require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				for _, r := range recs {
					id, info, usage, err := storage.GetInfo(ctx, r.Name)
					require.NoError(t, err)
					assert.Equal(t, storage.Record{Name: info.Name, ID: id, Kind: info.Kind, Parent: info.Parent,
						Labels: info.Labels, Created: info.Created, Updated: info.Updated, Usage: usage}, r)
				}
				return nil
			}))
			assert.Equal(t, snapshots.Usage{Size: 42, Inodes: 7}, recs[0].Usage)
			recs, err = walkAll(t, ms, "kind==view")
			require.NoError(t, err)
			require.Len(t, recs, 1)
			assert.Equal(t, "b", recs[0].Name)
		})
	}
}

// TestWalkRoundTripsPerPage: on etcd a Walk costs one request per page, not
// one per snapshot (usage comes with the record); with the watch cache, a
// walk asks etcd for its revision and reads the rest locally.
func TestWalkRoundTripsPerPage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cache  storage.EtcdOpt
		cached bool
		want   int64
	}{
		{"pages of 10 from etcd", storage.WithoutWatchCache(), false, 3},
		{"the revision from etcd, pages from the watch cache", storage.WithWatchCache(), true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int64
			ms := openEtcd(t, uniqueRoot(t), storage.WithPageSize(10), tc.cache,
				storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: &n} }))
			update(t, ms, func(ctx context.Context) error {
				for i := range 25 {
					if err := commitLayer(ctx, fmt.Sprintf("layer%02d", i), ""); err != nil {
						return err
					}
				}
				return nil
			})
			if tc.cached {
				require.NoError(t, storage.WaitWatchCacheCurrent(context.Background(), ms))
			}
			n.Store(0)
			recs, err := walkAll(t, ms)
			require.NoError(t, err)
			assert.Len(t, recs, 25)
			assert.Equal(t, tc.want, n.Load(), "25 records in pages of 10")
		})
	}
}

// TestFiltersRefuseBadRegexp: a regular expression that does not compile is
// refused with InvalidArgument before anything is read (containerd's
// filters would match nothing and log once per snapshot).
func TestFiltersRefuseBadRegexp(t *testing.T) {
	var n atomic.Int64
	ms := openEtcd(t, uniqueRoot(t), storage.WithoutWatchCache(), storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: &n} }))
	warmUp(t, ms)
	for _, tc := range []struct {
		filters []string
		bad     bool
	}{
		{[]string{"name~=["}, true},
		{[]string{"kind==active", "name~=(a"}, true},
		{[]string{`kind==active,labels.x~="a**"`}, true},
		{[]string{"name~=^layer[0-9]+$"}, false},
		{[]string{"kind==active,name!=x", "labels.y"}, false},
		{[]string{"kind=="}, true}, // does not parse
	} {
		t.Run(fmt.Sprint(tc.filters), func(t *testing.T) {
			err := storage.ValidateFilters(tc.filters...)
			if !tc.bad {
				require.NoError(t, err)
				return
			}
			assert.True(t, errdefs.IsInvalidArgument(err), "ValidateFilters: %v", err)
			n.Store(0)
			err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				if err := storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, tc.filters...); !errdefs.IsInvalidArgument(err) {
					return fmt.Errorf("WalkInfo: %v", err)
				}
				if err := storage.Walk(ctx, func(storage.Record) error { return nil }, tc.filters...); !errdefs.IsInvalidArgument(err) {
					return fmt.Errorf("Walk: %v", err)
				}
				return nil
			})
			require.NoError(t, err)
			assert.Zero(t, n.Load(), "nothing is read")
		})
	}
}

// TestWalkPassesOverCorruptRecords: a record that does not decode is
// reported at the end, after every readable one was handed over.
func TestWalkPassesOverCorruptRecords(t *testing.T) {
	dir := t.TempDir()
	ms := openBolt(t, dir)
	update(t, ms, func(ctx context.Context) error {
		for _, name := range []string{"a", "b", "c"} {
			if err := commitLayer(ctx, name, ""); err != nil {
				return err
			}
		}
		return nil
	})
	require.NoError(t, ms.Close())
	db, err := bolt.Open(filepath.Join(dir, "metadata.db"), 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)).Bucket([]byte("b")).Put([]byte(storage.KeyKind), []byte{1, 2})
	}))
	require.NoError(t, db.Close())

	ms = openBolt(t, dir)
	recs, err := walkAll(t, ms)
	require.Error(t, err)
	assert.ErrorIs(t, err, storage.ErrCorrupt)
	assert.True(t, errdefs.IsDataLoss(err), "class of %v", err)
	var ce *storage.CorruptRecordsError
	require.ErrorAs(t, err, &ce)
	require.Len(t, ce.Records, 1)
	assert.Equal(t, "b", ce.Records[0].Name)
	var names []string
	for _, r := range recs {
		names = append(names, r.Name)
	}
	// The active snapshots commitLayer made are committed away.
	assert.Equal(t, []string{"a", "c"}, names)
}
