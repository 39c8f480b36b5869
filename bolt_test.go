package storage_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

func openBolt(t testing.TB, dir string, opts ...storage.BoltOpt) storage.MetaStore {
	t.Helper()
	ms, err := storage.NewBoltMetaStore(filepath.Join(dir, "metadata.db"), opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	return ms
}

func TestBoltOpenFailsWithErrLockedWhenAnotherHolderKeepsTheFile(t *testing.T) {
	dir := t.TempDir()
	openBolt(t, dir)

	start := time.Now()
	_, err := storage.NewBoltMetaStore(filepath.Join(dir, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = 200 * time.Millisecond
		return nil
	})
	require.Error(t, err)
	assert.ErrorIs(t, err, storage.ErrLocked)
	assert.True(t, errdefs.IsUnavailable(err))
	assert.Contains(t, err.Error(), "locked by another process")
	assert.Less(t, time.Since(start), 5*time.Second)
}

func TestBoltOptErrorIsReturned(t *testing.T) {
	bad := assert.AnError
	_, err := storage.NewBoltMetaStore(filepath.Join(t.TempDir(), "metadata.db"), func(*bolt.Options) error { return bad })
	assert.ErrorIs(t, err, bad)
}

func TestBoltSmokeCreateCommitGet(t *testing.T) {
	ms := openBolt(t, t.TempDir())
	ctx := context.Background()
	require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a", ""); err != nil {
			return err
		}
		_, err := storage.CommitActive(ctx, "a", "base", snapshots.Usage{Size: 10})
		return err
	}))
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err := storage.GetInfo(ctx, "base")
		require.NoError(t, err)
		assert.Equal(t, "1", id)
		assert.Equal(t, snapshots.KindCommitted, info.Kind)
		assert.Equal(t, int64(10), usage.Size)
		return nil
	}))
}
