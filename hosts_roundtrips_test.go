package storage_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// TestEtcdHostScopeRoundTrips asserts the cost in etcd round trips of the
// operations of host scopes that the README quotes.
func TestEtcdHostScopeRoundTrips(t *testing.T) {
	root := uniqueRoot(t)
	var n atomic.Int64
	counting := storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: &n} })
	a := openEtcd(t, root, storage.WithHost("a"), storage.WithoutWatchCache(), counting)
	assert.Equal(t, int64(2), n.Load(), "opening WithHost: the root's mode and the lock (the lease grant is a third)")
	b := openEtcd(t, root, storage.WithHost("b"), storage.WithoutWatchCache(), counting)

	cost := func(ms storage.MetaStore, fn func(ctx context.Context) error) int64 {
		t.Helper()
		n.Store(0)
		require.NoError(t, ms.WithTransaction(context.Background(), true, fn))
		return n.Load()
	}
	update(t, a, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x1", "")
		return err
	})
	assert.Equal(t, int64(2), cost(a, func(ctx context.Context) error {
		_, err := storage.CommitShared(ctx, "x1", "a/base", "chain-1", snapshots.Usage{})
		return err
	}), "CommitShared + Commit")
	update(t, a, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a/work", "a/base")
		return err
	})
	assert.Equal(t, int64(4), cost(b, func(ctx context.Context) error {
		_, err := storage.BindLayer(ctx, "b/base", "", "chain-1")
		return err
	}), "BindLayer + Commit: name and parent, content index, layer, commit")
	n.Store(0)
	require.NoError(t, b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, err := storage.GetActiveSnapshot(ctx, "a", "a/work")
		return err
	}))
	assert.Equal(t, int64(2), n.Load(), "GetActiveSnapshot: the snapshot and its owner's lock")
	require.NoError(t, a.Close())
	assert.Equal(t, int64(4), cost(b, func(ctx context.Context) error {
		_, err := storage.TakeOver(ctx, "a", "a/work", "b/work", "b/base")
		return err
	}), "TakeOver + Commit: the snapshot, the owner's lock, name and parent, commit")
	assert.Equal(t, int64(2), cost(b, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "b/work")
		return err
	}), "Remove + Commit in a scope costs what it costs without scopes")
	assert.Equal(t, int64(3), cost(b, func(ctx context.Context) error {
		_, _, _, err := storage.Release(ctx, "b/base")
		return err
	}), "Release + Commit of a binding: the record with its children, the layer, commit")
}
