package storage_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// TestEtcdListHostsSeesLiveHosts: ListHosts reports a host whose store is
// open as alive, with its lease and the TTL left, and a closed one as gone.
//
// It fails today: the store puts its lock at <root>/storage.v1/lock/<host>
// (etcdKeys.lock), while ListHosts (and the layout documented in keys.go)
// look for <root>/storage.v1/hosts/<host>/lock, so every host is reported
// gone. Proposed fix, in etcd_codec.go:
//
//	func (k etcdKeys) lock(host string) string { return k.host(host) + "/" + KeyLock }
//
// (hostAlive, takeLease and the fence all go through etcdKeys.lock, so they
// follow; hosts/<host>/lock lies under the hosts/ prefix ListHosts reads.)
func TestEtcdListHostsSeesLiveHosts(t *testing.T) {
	root := uniqueRoot(t)
	_ = hostStore(t, root, "a")
	b := hostStore(t, root, "b")
	require.NoError(t, b.Close())

	cli, err := clientv3.New(etcdServer(t).ClientConfig())
	require.NoError(t, err)
	defer cli.Close()
	hosts, ok, err := storage.ListHosts(context.Background(), cli, root)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, hosts, 2)
	assert.Equal(t, "a", hosts[0].Name)
	assert.True(t, hosts[0].Alive, "host a's store is open")
	assert.NotZero(t, hosts[0].Lease)
	assert.Positive(t, hosts[0].TTL)
	assert.False(t, hosts[1].Alive, "host b's store is closed")
}
