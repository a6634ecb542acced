// Preload for node (`node -r ./localhost.js ...`): Omniboard has no option for the address it
// listens on and takes every interface; with this, every server of the process listens on
// 127.0.0.1 only. PORT=0 picks a free port; the line "listening on 127.0.0.1:N" tells which.
'use strict';
const net = require('net');

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, ...rest) {
  const callback = rest.find((a) => typeof a === 'function');
  this.once('listening', () => console.log(`listening on 127.0.0.1:${this.address().port}`));
  return listen.call(this, Number(port) || 0, '127.0.0.1', callback);
};
