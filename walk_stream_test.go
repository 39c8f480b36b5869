package storage_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snapmeta/storage"
)

// streamCountingKV counts page reads and range streams; refuse makes
// GetStream fail as a server older than etcd 3.7 does.
type streamCountingKV struct {
	clientv3.KV
	gets, streams *atomic.Int64
	refuse        bool
}

func (c streamCountingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.gets.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

// Do counts the page reads sent as operations (a transaction's single
// reads are).
func (c streamCountingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	if op.IsGet() {
		c.gets.Add(1)
	}
	return c.KV.Do(ctx, op)
}

func (c streamCountingKV) GetStream(ctx context.Context, key string, opts ...clientv3.OpOption) (clientv3.GetStreamChan, error) {
	c.streams.Add(1)
	if c.refuse {
		return nil, status.Error(codes.Unimplemented, "unknown method RangeStream")
	}
	return c.KV.GetStream(ctx, key, opts...)
}

// TestWalkStreamsLongRanges: a walk with many pages left after its first
// reads the rest in one stream at the transaction's revision (a write
// made meanwhile is not seen), stops cleanly when fn fails, and pages to
// the end on a server without streams.
func TestWalkStreamsLongRanges(t *testing.T) {
	root := uniqueRoot(t)
	var gets, streams atomic.Int64
	open := func(refuse bool) storage.MetaStore {
		// Without the watch cache, whose walks read its copy.
		return openEtcd(t, root, storage.WithoutWatchCache(), storage.WithPageSize(2), storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV {
			return streamCountingKV{KV: kv, gets: &gets, streams: &streams, refuse: refuse}
		}))
	}
	ms, writer := open(false), openEtcd(t, root)
	const n = 40
	update(t, ms, func(ctx context.Context) error {
		for i := range n {
			if err := commitLayer(ctx, fmt.Sprintf("layer%02d", i), ""); err != nil {
				return err
			}
		}
		return nil
	})

	gets.Store(0)
	var names []string
	err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.Walk(ctx, func(r storage.Record) error {
			if len(names) == 3 {
				update(t, writer, func(ctx context.Context) error { return commitLayer(ctx, "layer99", "") })
			}
			names = append(names, r.Name)
			return nil
		})
	})
	require.NoError(t, err)
	require.Len(t, names, n, "the layer written during the walk is not seen")
	for i, name := range names {
		assert.Equal(t, fmt.Sprintf("layer%02d", i), name)
	}
	assert.Equal(t, int64(1), gets.Load(), "one page read")
	assert.Equal(t, int64(1), streams.Load(), "then one stream")

	stop := errors.New("stop")
	seen := 0
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.Walk(ctx, func(storage.Record) error {
			if seen++; seen == 10 {
				return stop
			}
			return nil
		})
	})
	require.ErrorIs(t, err, stop)
	assert.Equal(t, 10, seen, "the walk stops at fn's error")

	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Empty(t, problems)

	old := open(true)
	gets.Store(0)
	streams.Store(0)
	recs, err := walkAll(t, old)
	require.NoError(t, err)
	assert.Len(t, recs, n+1)
	assert.Equal(t, int64(1), streams.Load(), "asked once")
	gets.Store(0)
	_, err = walkAll(t, old)
	require.NoError(t, err)
	assert.Equal(t, int64(1), streams.Load(), "not asked again")
	assert.Equal(t, int64((n+1)/2+1), gets.Load(), "pages to the end")
}
