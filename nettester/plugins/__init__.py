"""Protocol modules: one file each, each defining one IProtocolModule provider.

``nettester.tap`` finds them with ``twisted.plugin.getPlugins``; adding a
module is adding a file here.
"""
