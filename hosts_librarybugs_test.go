//go:build librarybugs

package storage_test

// Tests of library bugs found while the drivers gained host scopes. They
// fail until the bug is fixed, so they only run with -tags librarybugs:
//
//	go test -tags librarybugs -run 'LibraryBug' .

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// TestLibraryBugListHostsSeesALiveHost: ListHosts says whether a host is
// alive by looking for hosts/<host>/lock (the layout keys.go documents),
// but takeLease puts the lock at lock/<host> (etcdKeys.lock), so a host
// whose store is open is reported as not alive, with no lease.
func TestLibraryBugListHostsSeesALiveHost(t *testing.T) {
	root := uniqueRoot(t)
	ms := hostStore(t, root, "A")
	defer ms.Close()
	cli, err := clientv3.New(etcdServer(t).ClientConfig())
	require.NoError(t, err)
	defer cli.Close()
	hosts, ok, err := storage.ListHosts(context.Background(), cli, root)
	require.NoError(t, err)
	require.True(t, ok, "the root is host-scoped")
	require.Len(t, hosts, 1)
	assert.Equal(t, "A", hosts[0].Name)
	assert.True(t, hosts[0].Alive, "A's store is open")
	assert.NotZero(t, hosts[0].Lease)
}
